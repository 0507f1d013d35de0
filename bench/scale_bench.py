"""Scale: the daemon's event-loop lag around a 1,000,000-fragment client, and the access table's
operations at 1,000,000 fragments against the same operations at 1,000 (issue 7, item 8).

    .venv/bin/python bench/scale_bench.py [--fragments 1000000] [--small 1000]
        [--audit-interval 15] [--deadline-ms 10000] [--reps 3] [--profile FILE]
        [--daemon-gc on|off] [--skip-daemon] [--skip-table] [--out bench/results/scale.md]

Part 1, a real daemon (membrokerd with MEMBROKER_LOOP_PROBE_MS=1: a 1 ms timer whose lateness
is the histogram membroker_event_loop_lag_seconds and the gauge
membroker_event_loop_lag_max_seconds) and a real VA client process (bench/_client.py, the SDK).
The owner creates an 8 GiB memfd space (2 x fragments pages), shares it, and grants every other
page read-write with `grant_many` (1,000,000 ranges). Phases, each measured on its own:

    grant     grant_many of the pattern, nobody attached
    attach    the client process attaches (snapshot of 1,000,000 ranges pushed in frames) and
              applies it; ends when it prints "ready"
    audit     one periodic full audit of the attached client (MEMBROKER_AUDIT_INTERVAL_S)
    revoke    Revoke(client, 0, size): the whole pattern revoked from the attached client
    regrant   grant_many again while attached (AccessUpdate push), until the client applied it
    fence     the client is SIGSTOPped and one page is revoked: no ack by the deadline
              (--deadline-ms), fenced, then killed when still mapped

A separate scraper process reads /metrics every 20 ms. For each phase: probe samples, lag p50 and
p99 from the histogram bucket deltas (the bucket's upper bound: "≤"), the probe's max lag (exact
when the phase raised the daemon-wide max gauge, else the bucket it fell in), and the longest
/metrics round trip seen while the phase ran (another client of the same loop waiting behind
the work: an independent measure of the same stall, within a scrape period). Audits run every
`--audit-interval` seconds; every phase but "audit" starts right after an audit finished, and the
table says how many audits completed inside each phase. Goal: max lag under 50 ms.

Part 2, in-process (membrokerd.access.AccessTable, no daemon): grant_many build, effective(),
allowed_sets(), a page of 1,000 grants as ListGrants reads it, set_private and set_shared over
the whole space, revoke_many of every fragment, drop_client, forget_client, and a one-page
revoke in the middle (a local change: the median of 50 such revokes, each page granted again
after), each at `--fragments` and at `--small` fragments (every other page granted RW), printed
per fragment with the ratio large/small (the one-page revoke and the page of grants: per
operation). Goal: within 2x per fragment.
Each is measured with the garbage collector on (as in the daemon) and again with it off.

The measured source tree is whichever `membroker` this interpreter imports: the checkout, or a
snapshot first on PYTHONPATH (`git archive HEAD clients broker | tar -x -C /tmp/snap` and
`PYTHONPATH=/tmp/snap/clients:/tmp/snap/broker`); daemon and client run the same one.

Every process started here is ended by its pid. The whole run takes about 3-4 minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revoke_bench import ROOT, SRC_PATH, CpuMeter, Daemon, write_results

import membroker

PAGE = 4096
# The lag histogram's buckets (membrokerd.metrics), seconds; +Inf last.
LAG_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
GOAL_LAG_S = 0.050
SCRAPE_PERIOD_S = 0.020


# -- the scraper (a process of its own: no GIL shared with the owner's calls) ------------------

_METRIC = re.compile(rb"^(membroker_[a-z_]+)(\{[^}]*\})? (\S+)$", re.M)


def parse_metrics(body: bytes) -> dict[str, float]:
    """The lines we need from an exposition: lag buckets by bound, lag count and max, audits."""
    out: dict[str, float] = {}
    for name, labels, value in _METRIC.findall(body):
        key = name.decode()
        if key == "membroker_event_loop_lag_seconds_bucket":
            le = re.search(rb'le="([^"]+)"', labels or b"")
            if le is not None:
                key = f"lag_le_{le.group(1).decode()}"
        elif labels:
            continue
        out[key] = float(value)
    return out


def fetch(url: str, timeout: float = 60.0) -> bytes:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/metrics")
        return conn.getresponse().read()
    finally:
        conn.close()


def scraper_main(url: str, period: float) -> None:
    """Scrapes every `period` s until SIGTERM, one JSON line per scrape: send and receive
    times (CLOCK_MONOTONIC, shared by every process) and the parsed values."""
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        t0 = time.monotonic()
        try:
            values = parse_metrics(fetch(url))
        except OSError:
            values = {}
        t1 = time.monotonic()
        sys.stdout.write(json.dumps({"t0": t0, "t1": t1, "v": values}) + "\n")
        sys.stdout.flush()
        time.sleep(max(0.0, period - (t1 - t0)))


@dataclasses.dataclass
class Scrape:
    t0: float
    t1: float
    v: dict[str, float]


def load_scrapes(path: Path) -> list[Scrape]:
    out = []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line may be cut by the SIGTERM
        if d["v"]:
            out.append(Scrape(d["t0"], d["t1"], d["v"]))
    return out


def _bucket_counts(s: Scrape) -> list[float]:
    """Cumulative probe counts per bucket bound (LAG_BUCKETS, then +Inf)."""
    by_bound = {_le(k): v for k, v in s.v.items() if k.startswith("lag_le_")}
    return [by_bound.get(float(b), 0.0) for b in LAG_BUCKETS] + [by_bound.get(float("inf"), 0.0)]


def _le(key: str) -> float:
    return float(key.removeprefix("lag_le_"))  # "0.0001", "1.0", "+Inf"


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB = {n / 1e9:.1f} GB"
    return f"{n / (1 << 20):.1f} MiB"


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


@dataclasses.dataclass
class Window:
    """What the scrapes say about one phase."""

    samples: int
    p50: str
    p99: str
    max_lag: str
    max_lag_s: float  # exact, or the upper bound of its bucket
    max_exact: bool
    scrape_max_s: float
    audits: int
    audit_s: float


def window(scrapes: list[Scrape], start: float, end: float) -> Window:
    """Histogram deltas between the last scrape answered before `start` and the first sent
    after `end` (so every probe sample of the phase is in), plus the scrape round trips that
    overlapped the phase."""
    before = [s for s in scrapes if s.t1 <= start]
    after = [s for s in scrapes if s.t0 >= end]
    if not before or not after:
        raise RuntimeError("no scrape brackets a phase (did the scraper die?)")
    a, b = before[-1], after[0]
    ca, cb = _bucket_counts(a), _bucket_counts(b)
    delta = [y - x for x, y in zip(ca, cb, strict=True)]  # cumulative counts per bucket
    n = int(delta[-1])
    bounds = [*LAG_BUCKETS, float("inf")]

    def quantile(q: float) -> str:
        if n == 0:
            return "-"
        rank = q * n
        for bound, cum in zip(bounds, delta, strict=True):
            if cum >= rank:
                return f"≤ {_fmt_ms(bound)}" if bound != float("inf") else "> 5000"
        return "?"

    gauge_a = a.v.get("membroker_event_loop_lag_max_seconds", 0.0)
    gauge_b = b.v.get("membroker_event_loop_lag_max_seconds", 0.0)
    top = 0
    for i in range(len(delta)):
        if delta[i] - (delta[i - 1] if i else 0) > 0:
            top = i
    if gauge_b > gauge_a:
        max_lag, max_s, exact = f"{_fmt_ms(gauge_b)}", gauge_b, True
    elif n:
        lo = bounds[top - 1] if top else 0.0
        hi = bounds[top]
        max_lag, max_s, exact = f"in ({_fmt_ms(lo)}, {_fmt_ms(hi)}]", hi, False
    else:
        max_lag, max_s, exact = "-", 0.0, False
    overlapping = [s for s in scrapes if s.t1 >= start and s.t0 <= end]
    scrape_max = max((s.t1 - s.t0 for s in overlapping), default=0.0)
    audits = int(b.v.get("membroker_audits_total", 0) - a.v.get("membroker_audits_total", 0))
    audit_s = b.v.get("membroker_audit_duration_seconds_sum", 0) - a.v.get(
        "membroker_audit_duration_seconds_sum", 0
    )
    return Window(
        n, quantile(0.5), quantile(0.99), max_lag, max_s, exact, scrape_max, audits, audit_s
    )


# -- part 1: the daemon ----------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    name: str
    what: str
    start: float
    end: float = 0.0
    note: str = ""
    rss_kib: int = 0


class Client:
    """bench/_client.py as a process: attach, then answer commands (see its docstring)."""

    def __init__(self, runtime_dir: Path, name: str, space_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_client.py"), str(runtime_dir), name, space_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=SRC_PATH),
        )
        self.pid = self.proc.pid

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def wait_seq(self, seq: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while int(self.ask("seq")) < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"client did not reach seq {seq}")
            time.sleep(0.05)

    def end(self) -> None:
        """Ends the process by its pid (SIGCONT first, in case it was left stopped)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def audits_done(url: str) -> float:
    return parse_metrics(fetch(url)).get("membroker_audits_total", 0.0)


def wait_for_audit(url: str, timeout: float) -> None:
    """Returns right after the next periodic audit finished: the next one is an interval away."""
    first = audits_done(url)
    deadline = time.monotonic() + timeout
    while audits_done(url) <= first:
        if time.monotonic() > deadline:
            raise TimeoutError("no audit finished in time")
        time.sleep(0.05)


def run_daemon_phases(
    fragments: int,
    audit_interval: float,
    deadline_ms: int,
    profile: Path | None,
    tmp: Path,
    collect: bool = True,
) -> tuple[list[Phase], list[Scrape], dict[str, str]]:
    size = 2 * fragments * PAGE
    spans = [(2 * i * PAGE, PAGE) for i in range(fragments)]
    env = {
        "MEMBROKER_LOOP_PROBE_MS": "1",
        "MEMBROKER_AUDIT_INTERVAL_S": str(audit_interval),
        "MEMBROKER_REVOKE_DEADLINE_MS": str(deadline_ms),
        # A read-write fragment counts twice toward the quota (readable and writable sets):
        # the default of 1,000,000 admits only 500,000 read-write fragments.
        "MEMBROKER_MAX_GRANT_FRAGMENTS_PER_CLIENT": str(2 * fragments + 16),
    }
    daemon = Daemon(
        tmp / "rt", env=env, metrics=True, profile=profile, log=tmp / "daemon.log", collect=collect
    )
    url = daemon.metrics_url
    assert url is not None
    scrape_log = tmp / "scrapes.jsonl"
    with open(scrape_log, "wb") as log_file:
        scraper = subprocess.Popen(
            [sys.executable, __file__, "--scrape", url],
            stdout=log_file,
            env=dict(os.environ, PYTHONPATH=SRC_PATH),
        )
    phases: list[Phase] = []
    info: dict[str, str] = {}
    client: Client | None = None

    @contextlib.contextmanager
    def phase(name: str, what: str) -> Iterator[Phase]:
        time.sleep(0.1)  # an idle stretch for the scrapes to bracket the phase
        p = Phase(name, what, time.monotonic())
        yield p
        p.end = time.monotonic()
        p.rss_kib = daemon.rss_kib()
        phases.append(p)
        print(f"  {name}: {p.end - p.start:.2f} s {p.note}", flush=True)

    try:
        with membroker.connect("scale-owner", daemon.runtime_dir) as owner:
            space = owner.create_space(size)
            space.share(0, size)
            info["rss_empty"] = f"{daemon.rss_kib() / 1024:.0f} MiB"
            wait_for_audit(url, 3 * audit_interval)
            with phase("grant", f"grant_many of {fragments:,} RW ranges, nobody attached"):
                space.grant_many("big", spans, "rw")
            wait_for_audit(url, 3 * audit_interval)
            with phase("attach", "client process attaches and applies the snapshot") as p:
                client = Client(daemon.runtime_dir, "big", space.space_id)
                if client.line() != "ready":
                    raise RuntimeError("the client failed to attach")
                p.note = f"(client holds {client.ask('held')} ranges)"
            with phase("audit", "waiting for the next periodic audit of the attached client"):
                wait_for_audit(url, 3 * audit_interval)
            with phase("revoke", "Revoke(client, 0, size): every fragment, client attached") as p:
                report = space.revoke("big", 0, size)
                p.note = (
                    f"(report: {report.clients[0].outcome if report.clients else 'no client'}, "
                    f"{report.duration_us / 1e3:.0f} ms, {report.revoked_bytes >> 20} MiB)"
                )
                info["revoke"] = p.note
            wait_for_audit(url, 3 * audit_interval)
            with phase("regrant", "grant_many again while attached, until the client applied it"):
                seq = space.grant_many("big", spans, "rw")
                client.wait_seq(seq, 120)
            wait_for_audit(url, 3 * audit_interval)
            with phase("fence", "client SIGSTOPped, one page revoked: no ack, fenced") as p:
                os.kill(client.pid, signal.SIGSTOP)
                report = space.revoke("big", size // 2, PAGE)
                c = report.clients[0] if report.clients else None
                p.note = (
                    f"(report: {c.outcome}, fence {c.fence!r}, {report.duration_us / 1e3:.0f} ms"
                    f" incl. the {deadline_ms} ms deadline; {c.reason})"
                    if c is not None
                    else "(no client in the report)"
                )
                info["fence"] = p.note
            time.sleep(0.3)
            info["rss_end"] = f"{daemon.rss_kib() / 1024:.0f} MiB"
    finally:
        if client is not None:
            client.end()
        time.sleep(2 * SCRAPE_PERIOD_S)
        scraper.send_signal(signal.SIGTERM)
        try:
            scraper.wait(10)
        except subprocess.TimeoutExpired:
            scraper.kill()
            scraper.wait(5)
        daemon.stop()
    return phases, load_scrapes(scrape_log), info


# -- part 2: the table, in process -------------------------------------------------------------


ONE_PAGE_OPS = 50  # one-page revokes timed per repetition (one alone is all cache misses)


def table_ops(fragments: int, reps: int, collect: bool = True) -> dict[str, float]:
    """Median seconds of each operation on a table holding `fragments` RW fragments of one
    client (every other page), fresh tables where an operation destroys the pattern. With
    `collect` False the cyclic garbage collector is off while they run."""
    from membrokerd.access import Access, AccessTable

    if not collect:
        gc.disable()
        try:
            return table_ops(fragments, reps, True)
        finally:
            gc.enable()

    size = 2 * fragments * PAGE
    spans = [(2 * i * PAGE, PAGE) for i in range(fragments)]
    samples: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., object], *args: object) -> None:
        t0 = time.perf_counter()
        result = fn(*args)
        samples.setdefault(name, []).append(time.perf_counter() - t0)
        del result  # freed outside the timing, like a caller that drops it later

    def build() -> AccessTable:
        t = AccessTable(size)
        t.set_shared(0, size)
        timed("grant_many (build)", t.grant_many, "c", spans, Access.RW)
        return t

    middle = (fragments // 2) * 2 * PAGE
    for _ in range(reps):
        t = build()
        timed("effective()", t.effective, "c")
        timed("allowed_sets()", t.allowed_sets, "c")
        timed("grants_page, 1,000 records (per op)", t.grants_page, "c", "c", 0, 1000)
        timed("set_private over all", t.set_private, 0, size)
        timed("set_shared over all", t.set_shared, 0, size)
        for k in range(ONE_PAGE_OPS):  # pages around the middle, each revoked and granted again
            page = middle + 2 * PAGE * (k - ONE_PAGE_OPS // 2)
            timed("revoke one page in the middle (per op)", t.revoke, "c", page, PAGE)
            t.grant("c", page, PAGE, Access.RW)
        timed("revoke_many (every fragment)", t.revoke_many, "c", spans)
        t = build()
        timed("drop_client", t.drop_client, "c")
        t = build()
        timed("forget_client", t.forget_client, "c")
        del t
        if gc.isenabled():
            gc.collect()
    return {name: statistics.median(v) for name, v in samples.items()}


PER_OP = {
    "revoke one page in the middle (per op)",
    "grants_page, 1,000 records (per op)",
}


# -- report ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--audit-interval", type=float, default=15.0)
    parser.add_argument(
        "--deadline-ms",
        type=int,
        default=10_000,
        help="MEMBROKER_REVOKE_DEADLINE_MS: long enough for the client to tear down the whole "
        "pattern (the fence phase waits it out)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions at --fragments")
    parser.add_argument("--profile", type=Path, help="run the daemon under cProfile, stats here")
    parser.add_argument(
        "--daemon-gc",
        choices=("on", "off"),
        default="on",
        help="off: the daemon runs with the cyclic garbage collector disabled (an experiment "
        "that shows which stalls are the collector's)",
    )
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    parser.add_argument("--scrape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scrape:
        scraper_main(args.scrape, SCRAPE_PERIOD_S)
        return 0
    started = time.monotonic()
    load_before = os.getloadavg()
    cpu = CpuMeter()
    out: list[str] = []
    if not args.skip_daemon:
        print("daemon phases:", flush=True)
        with tempfile.TemporaryDirectory(prefix="membroker-scale-") as tmp:
            phases, scrapes, info = run_daemon_phases(
                args.fragments,
                args.audit_interval,
                args.deadline_ms,
                args.profile,
                Path(tmp),
                args.daemon_gc == "on",
            )
        out += [
            f"## Event-loop lag, {args.fragments:,}-fragment VA client "
            f"({_size(2 * args.fragments * PAGE)} memfd, every other page RW)",
            "",
            "| phase | what | s | probe samples | lag p50 ms | lag p99 ms | lag max ms (probe) "
            "| longest /metrics round trip ms | audits in phase | daemon RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        verdicts = []
        for p in phases:
            w = window(scrapes, p.start, p.end)
            audits = f"{w.audits}" + (f" ({w.audit_s:.2f} s)" if w.audits else "")
            out.append(
                f"| {p.name} | {p.what} | {p.end - p.start:.2f} | {w.samples} | {w.p50} | "
                f"{w.p99} | {w.max_lag} | {_fmt_ms(w.scrape_max_s)} | {audits} | "
                f"{p.rss_kib / 1024:.0f} |"
            )
            worst = max(w.max_lag_s if w.max_exact else 0.0, w.scrape_max_s)
            verdicts.append(
                f"{p.name} {'met' if worst < GOAL_LAG_S else 'NOT met'} ({_fmt_ms(worst)} ms)"
            )
        out += [
            "",
            "Goal, max lag under 50 ms, per phase: " + "; ".join(verdicts) + ".",
            "",
            f"Revoke of the whole pattern {info.get('revoke', '')}. Fence {info.get('fence', '')}.",
            f"Daemon RSS: {info.get('rss_empty', '?')} with the empty space, "
            f"{info.get('rss_end', '?')} at the end.",
            "",
            "p50/p99 are bucket upper bounds of the probe histogram's deltas over the phase; a "
            "stall of L ms is one probe sample (the ticks it swallowed are not samples), so the "
            "max and the /metrics round trip say more than p99 does. The probe max is exact "
            "where the phase raised the daemon-wide maximum, else the bucket it fell in.",
        ]
        if args.profile:
            out += ["", f"The daemon ran under cProfile (stats in {args.profile}): times inflated."]
        if args.daemon_gc == "off":
            out += ["", "The daemon ran with the cyclic garbage collector disabled (experiment)."]
    if not args.skip_table:
        print("table operations:", flush=True)
        small_reps = max(10, args.reps * 5)
        small = table_ops(args.small, small_reps)
        large = table_ops(args.fragments, args.reps)
        small_nogc = table_ops(args.small, small_reps, collect=False)
        large_nogc = table_ops(args.fragments, args.reps, collect=False)
        out += [
            "",
            f"## Access table operations, {args.fragments:,} vs {args.small:,} fragments "
            "(in process, medians)",
            "",
            f"| operation | {args.small:,}: ms | {args.fragments:,}: ms | per fragment "
            f"{args.small:,}: ns | per fragment {args.fragments:,}: ns | ratio | within 2x | "
            f"ratio, gc off | {args.fragments:,}: ms, gc off |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for name, t_large in large.items():
            t_small = small[name]
            nogc = large_nogc[name] / small_nogc[name]
            if name in PER_OP:
                ratio = t_large / t_small
                out.append(
                    f"| {name} | {t_small * 1e3:.3f} | {t_large * 1e3:.3f} | - | - | "
                    f"{ratio:.1f} (per op) | {'yes' if ratio <= 2 else 'NO'} | {nogc:.1f} | "
                    f"{large_nogc[name] * 1e3:.3f} |"
                )
                continue
            per_s, per_l = t_small / args.small, t_large / args.fragments
            ratio = per_l / per_s
            nogc = nogc * args.small / args.fragments
            out.append(
                f"| {name} | {t_small * 1e3:.3f} | {t_large * 1e3:.1f} | {per_s * 1e9:.0f} | "
                f"{per_l * 1e9:.0f} | {ratio:.2f} | {'yes' if ratio <= 2 else 'NO'} | "
                f"{nogc:.2f} | {large_nogc[name] * 1e3:.1f} |"
            )
        out += [
            "",
            f"Medians of {small_reps} runs at {args.small:,} and {args.reps} at "
            f"{args.fragments:,}; garbage collection on, as in the daemon (the last two columns: "
            "the same with the cyclic collector off, to show what of the growth is the "
            "collector walking a million new objects).",
        ]
    load_after = os.getloadavg()
    out += [
        "",
        f"Run time {time.monotonic() - started:.0f} s; load average before / after "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}; {cpu.summary()}.",
    ]
    text = "\n".join(out)
    print(text)
    write_results(
        args.out,
        f"Scale: event-loop lag and table operations at {args.fragments:,} fragments",
        ".",
        text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
