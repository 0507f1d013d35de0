"""Floods: an honest VA client's revoke latency and the daemon's memory while another peer floods
the session socket, side by side with the same run without a flood (issue 7, item 9).

    .venv/bin/python bench/flood_bench.py [--seconds 5] [--connects 20] [--max-open 900]
        [--profile FILE] [--out bench/results/flood.md]

One daemon (MEMBROKER_LOOP_PROBE_MS=1, MEMBROKER_SESSION_SOCKET_MODE=0666 so that another uid
can reach it; max_pending_hellos_per_uid 16 and hello_timeout_s 2, the defaults), one owner,
one honest VA client process (bench/_client.py) granted one page. Scenarios, in this order:

    quiet        no flood
    ping flood   a raw peer (root) says a valid Hello, then sends Ping frames as fast as its
                 socket takes them and never reads anything (not even the Welcome)
    quiet again  the ping flooder is gone
    CPU hog      no flood: a process spinning on one CPU, the control for what a flooder's own
                 CPU time costs everyone else on a 2-CPU machine
    hello flood  a raw peer running as uid nobody keeps up to --max-open connections open that
                 never say Hello: whenever the daemon closes one (refused over the per-uid cap,
                 or timed out), it connects again at once
    quiet last   the hello flooder is gone

In each (a flood gets 1 s to build up first): for --seconds, the owner's Revoke of the honest
client's page (push, teardown, ack, verification) and a grant back, 2 ms apart, p50/p99/max of
the Revoke; then --connects fresh sessions of root (connect + Hello + Welcome + close) timed,
through the SDK (its connect has a timeout, so a full listen backlog fails it at once: counted
as refused, with the reason) and raw (a blocking connect that waits for room in the backlog);
VmRSS of the daemon (before the flood starts, max while measuring, 2.5 s after it ended) and
its open fds then; the event-loop lag from the daemon's 1 ms probe (histogram deltas over
the scenario); and what the flooder achieved (bytes sent and how long its sends have been
stalled; connections made, refused, timed out).

The measured source tree is whichever `membroker` this interpreter imports (see scale_bench.py).
Every process started here is ended by its pid. The run takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revoke_bench import ROOT, SRC_PATH, CpuMeter, Daemon, percentiles, write_results
from scale_bench import Client, Scrape, fetch, parse_metrics, window

import membroker
from membroker import wire
from membroker.v1 import session_pb2 as spb

PAGE = 4096
NOBODY = 65534


# -- the flooders (processes of their own) -----------------------------------------------------


def _stopper() -> list[bool]:
    stop = [False]

    def on_term(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    return stop


def flood_pings(path: str, seconds: float) -> dict[str, Any]:
    """Hello, then Pings for ever, never reading."""
    stop = _stopper()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name="flooder"))))
    print(json.dumps({"ready": True}), flush=True)
    batch = memoryview(
        b"".join(wire.encode(spb.Frame(ping=spb.Ping(nonce=i))) for i in range(1, 8192))
    )
    s.setblocking(False)
    sent = offset = 0
    ended = ""
    start = last_progress = time.monotonic()
    while not stop[0] and time.monotonic() - start < seconds:
        try:
            n = s.send(batch[offset:])
        except BlockingIOError:
            select.select([], [s], [], 0.05)
            continue
        except OSError as exc:
            ended = f"{type(exc).__name__}: {exc}"
            break
        sent += n
        offset = (offset + n) % len(batch)
        last_progress = time.monotonic()
    return {
        "sent": sent,
        "stalled_s": round(time.monotonic() - last_progress, 2),
        "ended": ended or "still connected",
    }


def flood_hellos(path: str, seconds: float, uid: int, max_open: int) -> dict[str, Any]:
    """Up to `max_open` connections that never say Hello, replaced as soon as one is closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, max_open + 64)), hard))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    stop = _stopper()
    poller = select.poll()
    open_socks: dict[int, tuple[socket.socket, wire.FrameDecoder]] = {}
    counts = {"connects": 0, "refused_cap": 0, "timed_out": 0, "other": 0, "backlog_full": 0}
    print(json.dumps({"ready": True, "uid": os.getuid()}), flush=True)
    start = time.monotonic()
    while not stop[0] and time.monotonic() - start < seconds:
        while len(open_socks) < max_open:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(path)
            except BlockingIOError:  # the listen backlog is full
                s.close()
                counts["backlog_full"] += 1
                break
            counts["connects"] += 1
            open_socks[s.fileno()] = (s, wire.FrameDecoder())
            poller.register(s.fileno(), select.POLLIN)
        for fd, _ in poller.poll(10):
            s, decoder = open_socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            message = ""
            if data:
                with contextlib.suppress(Exception):
                    for frame, _ in decoder.feed(data, []):
                        if frame.WhichOneof("body") == "error":
                            message = frame.error.message
                if not message:
                    continue  # the rest of the frame, or the close, comes next
            if "waiting to say Hello" in message:
                counts["refused_cap"] += 1
            elif "no Hello within" in message:
                counts["timed_out"] += 1
            else:
                counts["other"] += 1
            poller.unregister(fd)
            del open_socks[fd]
            decoder.close()
            s.close()
    counts["open_at_end"] = len(open_socks)
    counts["seconds"] = round(time.monotonic() - start, 1)
    for s, _ in open_socks.values():
        s.close()
    return counts


def spin(seconds: float) -> dict[str, Any]:
    """No flood at all: one CPU kept busy (the control for what a flooder's own CPU costs the
    others on a 2-CPU machine)."""
    stop = _stopper()
    print(json.dumps({"ready": True}), flush=True)
    start = time.monotonic()
    loops = 0
    while not stop[0] and time.monotonic() - start < seconds:
        loops += 1
    return {"spun_s": round(time.monotonic() - start, 1)}


class Flooder:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--flooder", *args],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=SRC_PATH),
        )
        first = self._line(30)
        if not first.get("ready"):
            raise RuntimeError(f"flooder did not start: {first}")

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return {}
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def stop(self) -> dict[str, Any]:
        """SIGTERM by pid; its report."""
        report: dict[str, Any] = {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            report = self._line(30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return report


# -- the measurement ---------------------------------------------------------------------------


def scrape(url: str) -> Scrape:
    t0 = time.monotonic()
    values = parse_metrics(fetch(url))
    return Scrape(t0, time.monotonic(), values)


def raw_session(path: str, name: str) -> float:
    """Seconds from a blocking connect (which waits while the listen backlog is full, where
    the SDK's connect with a timeout fails at once with EAGAIN) to the Welcome."""
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name=name))))
        s.settimeout(30)
        decoder = wire.FrameDecoder()
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed before the Welcome")
            for frame, _ in decoder.feed(data, []):
                if frame.WhichOneof("body") == "welcome":
                    return time.perf_counter() - t0
                if frame.WhichOneof("body") == "error":
                    raise ConnectionError(frame.error.message)
    finally:
        s.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def measure(
    daemon: Daemon, space: membroker.OwnedSpace, seconds: float, connects: int, rss_before: int
) -> dict[str, Any]:
    """Revokes of the honest client's page (each granted back, 2 ms apart) for `seconds`, then
    `connects` fresh sessions; the daemon's RSS sampled along the way."""
    assert daemon.metrics_url is not None
    before = scrape(daemon.metrics_url)
    start = time.monotonic()
    revokes: list[float] = []
    rss_max = max(rss_before, daemon.rss_kib())
    not_acked = 0
    while time.monotonic() - start < seconds:
        t0 = time.perf_counter()
        report = space.revoke("honest", 0, PAGE)
        revokes.append(time.perf_counter() - t0)
        if not report.all_acked:
            not_acked += 1
        space.grant("honest", 0, PAGE)
        if len(revokes) % 10 == 0:
            rss_max = max(rss_max, daemon.rss_kib())
        time.sleep(0.002)
    sessions: list[float] = []
    refused = 0
    reasons: dict[str, int] = {}
    for i in range(connects):
        t0 = time.perf_counter()
        try:
            with membroker.connect(f"probe-{i}", daemon.runtime_dir, timeout=10):
                pass
        except membroker.errors.MembrokerError as exc:
            refused += 1
            reasons[str(exc)[:160]] = reasons.get(str(exc)[:160], 0) + 1
            continue
        sessions.append(time.perf_counter() - t0)
        rss_max = max(rss_max, daemon.rss_kib())
    raw = [
        raw_session(str(daemon.runtime_dir / "session.sock"), f"raw-{i}") for i in range(connects)
    ]
    end = time.monotonic()
    after = scrape(daemon.metrics_url)
    return {
        "n": len(revokes),
        "revoke": percentiles(revokes),
        "revoke_max": max(revokes) * 1e6,
        "not_acked": not_acked,
        "session": (statistics.median(sessions) * 1e6, max(sessions) * 1e6) if sessions else None,
        "refused": refused,
        "raw": (statistics.median(raw) * 1e6, max(raw) * 1e6),
        "reasons": reasons,
        "rss": [rss_before, rss_max],
        "lag": window([before, after], start, end),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario")
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--max-open", type=int, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flood.md")
    parser.add_argument("--profile", type=Path, help="run the daemon under cProfile, stats here")
    parser.add_argument("--flooder", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flooder:
        kind, path, seconds = args.flooder[:3]
        if kind == "pings":
            result = flood_pings(path, float(seconds))
        elif kind == "spin":
            result = spin(float(seconds))
        else:
            result = flood_hellos(path, float(seconds), int(args.flooder[3]), args.max_open)
        print(json.dumps(result), flush=True)
        return 0

    load_before = os.getloadavg()
    cpu = CpuMeter()
    results: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="membroker-flood-") as tmp:
        os.chmod(tmp, 0o755)  # uid nobody must reach session.sock
        env = {"MEMBROKER_LOOP_PROBE_MS": "1", "MEMBROKER_SESSION_SOCKET_MODE": "0666"}
        daemon = Daemon(
            Path(tmp) / "rt",
            env=env,
            metrics=True,
            log=Path(tmp) / "daemon.log",
            profile=args.profile,
        )
        sock_path = str(daemon.runtime_dir / "session.sock")
        client: Client | None = None
        flooder: Flooder | None = None
        try:
            with membroker.connect("flood-owner", daemon.runtime_dir) as owner:
                space = owner.create_space(1 << 20)
                space.share(0, 1 << 20)
                space.grant("honest", 0, PAGE)
                client = Client(daemon.runtime_dir, "honest", space.space_id)
                if client.line() != "ready":
                    raise RuntimeError("the honest client failed to attach")
                measure(daemon, space, 0.5, 2, daemon.rss_kib())  # warm-up
                logged = (Path(tmp) / "daemon.log").read_bytes().count(b"\n")
                plan: list[tuple[str, list[str] | None]] = [
                    ("quiet", None),
                    ("ping flood (1 peer, never reads)", ["pings", sock_path, "600"]),
                    ("quiet again", None),
                    ("CPU hog, no connection (control)", ["spin", sock_path, "600"]),
                    (
                        f"Hello-less flood (uid {NOBODY}, up to {args.max_open} open)",
                        ["hellos", sock_path, "600", str(NOBODY)],
                    ),
                    ("quiet last", None),
                ]
                for name, flood in plan:
                    rss_before = daemon.rss_kib()
                    flooder = Flooder(*flood) if flood else None
                    if flooder is not None:
                        time.sleep(1.0)  # the flood in full swing
                    print(f"  {name} ...", flush=True)
                    row = measure(daemon, space, args.seconds, args.connects, rss_before)
                    report = flooder.stop() if flooder is not None else {}
                    flooder = None
                    time.sleep(2.5)  # pending connections time out, fds and memory come back
                    row["rss"].append(daemon.rss_kib())
                    row["fds"] = open_fds(daemon.pid)
                    log_lines = (Path(tmp) / "daemon.log").read_bytes().count(b"\n")
                    row["log_lines"], logged = log_lines - logged, log_lines
                    print(f"    revoke p50/p99 {row['revoke'][0]:.0f}/{row['revoke'][1]:.0f} µs")
                    results.append((name, row, report))
        finally:
            if flooder is not None:
                flooder.stop()
            if client is not None:
                client.end()
            daemon.stop()
    load_after = os.getloadavg()

    lines = [
        "| scenario | revokes | Revoke p50 µs | p99 µs | max µs | not acked | new SDK session "
        "p50 / max µs (refused) | raw session, blocking connect, p50 / max µs | loop lag p99 / "
        "max ms | daemon RSS MiB before / max / after | daemon fds after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r, _ in results:
        session = (
            f"{r['session'][0]:.0f} / {r['session'][1]:.0f}" if r["session"] is not None else "-"
        )
        rss = " / ".join(f"{v / 1024:.1f}" for v in r["rss"])
        lines.append(
            f"| {name} | {r['n']} | {r['revoke'][0]:.0f} | {r['revoke'][1]:.0f} | "
            f"{r['revoke_max']:.0f} | "
            f"{r['not_acked']} | {session} ({r['refused']}) | {r['raw'][0]:.0f} / "
            f"{r['raw'][1]:.0f} | {r['lag'].p99} / "
            f"{r['lag'].max_lag} | {rss} | {r['fds']} |"
        )
    quiet = results[0][1]
    lines.append("")
    for name, r, report in results:
        if not report or "spun_s" in report:
            continue
        lines.append(
            f"{name}: Revoke p99 {r['revoke'][1] / quiet['revoke'][1]:.2f}x the quiet run's, "
            f"p50 {r['revoke'][0] / quiet['revoke'][0]:.2f}x; daemon RSS max "
            f"{(r['rss'][1] - r['rss'][0]) / 1024:+.1f} MiB over its own start; "
            f"{r['log_lines']} lines of daemon log (WARNING level). "
            + (f"New sessions refused: {json.dumps(r['reasons'])}. " if r["reasons"] else "")
            + f"Flooder: {json.dumps(report)}."
        )
    lines += [
        "",
        "Loop lag: bucket upper bounds of the daemon's 1 ms probe histogram over the scenario "
        "(the max is exact where the scenario raised the daemon-wide maximum).",
        f"Load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"{cpu.summary()}.",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(
        args.out,
        "Floods: an honest client's revoke and the daemon's memory",
        f"; {args.seconds:g} s of revokes and {args.connects} new sessions per scenario.",
        text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
