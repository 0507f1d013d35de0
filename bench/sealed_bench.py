"""Sealed VA mode beside its baselines, measured in the same run (issue 8).

    .venv/bin/python bench/sealed_bench.py [--reps N] [--out bench/results/sealed.md]

Rows, each inside a real client process against a real daemon:
- sequential first touch of 64 MiB (one byte per page) through a sealed client, against the
  same touch through a plain MAP_SHARED mapping of the same memfd (native minor faults);
- random first touches of single pages (every other page granted, so no fault-around helps):
  as the client sees them, and the broker's own time per fault (the daemon's
  membroker_fault_handler_seconds histogram, interpolated);
- write revoke (rw -> ro) of a page held by 1 and 32 clients: sealed (the broker write-protects,
  no acknowledgement) against cooperative (each client mprotects and acknowledges);
- steady-state read and write bandwidth through the sealed mapping, through a plain mapping,
  and between two anonymous buffers (memcpy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from revoke_bench import SRC_PATH, CpuMeter, Daemon, git_state, percentiles

import membroker

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
SIZE = 64 << 20


class Client:
    def __init__(self, runtime_dir: Path, name: str, space_id: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "_sealed_client.py"),
                str(runtime_dir),
                name,
                space_id,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=SRC_PATH),
        )
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError("a benchmark client died")
        return line

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def histogram_buckets(url: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of each bucket of a Prometheus histogram."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return buckets


def histogram_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]], qs: tuple[float, ...]
) -> list[float]:
    """Quantiles (seconds) of what a histogram counted between two scrapes, interpolated
    within buckets."""
    counts = dict(before)
    buckets = [(le, n - counts.get(le, 0.0)) for le, n in after]
    total = buckets[-1][1] if buckets else 0
    out = []
    for q in qs:
        want, prev_le, prev_n = q * total, 0.0, 0.0
        for le, n in buckets:
            if n >= want:
                if le == float("inf"):
                    out.append(prev_le)
                else:
                    share = (want - prev_n) / (n - prev_n) if n > prev_n else 1
                    out.append(prev_le + (le - prev_le) * share)
                break
            prev_le, prev_n = le, n
    return out


def first_touch_rows(runtime_dir: Path, reps: int) -> list[tuple[str, str]]:
    rows = []
    with membroker.connect("bench-owner", runtime_dir) as owner:
        space = owner.create_space(SIZE)
        with space.map() as mem:  # every page in the page cache: first touches are minor faults
            mem.view(0, SIZE)[:] = b"\x01" * SIZE
        space.share(0, SIZE)
        space.grant("t", 0, SIZE, "rw")
        space.grant("t-fd", 0, SIZE, "rw")
        c = Client(runtime_dir, "t", space.space_id)
        try:
            assert c.ask("va sealed") == "sealed"
            c.ask("fd")
            sealed, native = [], []
            for _ in range(reps):
                native.append(c.ask("native_seq"))
                sealed.append(c.ask("seq"))
                # Take it back and give it again: the client zaps, the next touch is first.
                space.revoke("t", 0, SIZE)
                space.grant("t", 0, SIZE, "rw")
            n, s = statistics.median(native), statistics.median(sealed)
            rows.append(
                ("first touch of 64 MiB, native minor faults (plain mapping)", f"{n * 1e3:.2f} ms")
            )
            rows.append(
                (
                    "first touch of 64 MiB, sealed client (2 MiB windows, read-ahead in order)",
                    f"{s * 1e3:.2f} ms",
                )
            )
            rows.append(("  sealed / native speed (goal >= 0.9)", f"{n / s:.2f}"))
            c.ask("seq")
            va_r, va_w = c.ask("bw")
            nat_r, nat_w = c.ask("native_bw")
            cp_r, cp_w = c.ask("memcpy_bw")
            rows.append(
                ("memcpy between anonymous buffers, read / write GB/s", f"{cp_r:.1f} / {cp_w:.1f}")
            )
            rows.append(
                ("plain mapping of the memfd, read / write GB/s", f"{nat_r:.1f} / {nat_w:.1f}")
            )
            rows.append(("sealed mapping, read / write GB/s", f"{va_r:.1f} / {va_w:.1f}"))
            rows.append(
                (
                    "  sealed / plain mapping, read / write (goal >= 0.95)",
                    f"{va_r / nat_r:.2f} / {va_w / nat_w:.2f}",
                )
            )
        finally:
            c.close()
        space.delete()
    return rows


def random_touch_rows(daemon: Daemon, runtime_dir: Path) -> list[tuple[str, str]]:
    assert daemon.metrics_url is not None
    with membroker.connect("bench-owner", runtime_dir) as owner:
        space = owner.create_space(SIZE)
        with space.map() as mem:
            mem.view(0, SIZE)[:] = b"\x02" * SIZE
        space.share(0, SIZE)
        space.grant_many("r", [(p * PAGE, PAGE) for p in range(0, SIZE // PAGE, 2)], "ro")
        name = "membroker_fault_handler_seconds"
        before = histogram_buckets(daemon.metrics_url, name)
        c = Client(runtime_dir, "r", space.space_id)
        try:
            assert c.ask("va sealed") == "sealed"
            samples = c.ask("rand 4000 2")
        finally:
            c.close()
        after = histogram_quantiles(
            before, histogram_buckets(daemon.metrics_url, name), (0.5, 0.99)
        )
        space.delete()
    p50, p99, _mean = percentiles(samples)
    return [
        (
            "random single-page first touch, as the client sees it, p50 / p99",
            f"{p50:.1f} / {p99:.1f} us",
        ),
        (
            "  broker time per fault (handler histogram), p50 / p99 (goal p50 <= 20 us)",
            f"{after[0] * 1e6:.1f} / {after[1] * 1e6:.1f} us",
        ),
    ]


def write_revoke_rows(runtime_dir: Path, k: int, n: int) -> list[tuple[str, str]]:
    rows = []
    for mode in ("cooperative", "sealed"):
        with membroker.connect("bench-owner", runtime_dir) as owner:
            space = owner.create_space(1 << 20)
            space.share(0, 1 << 20)
            names = [f"w{i}" for i in range(k)]
            for name in names:
                space.grant(name, 0, PAGE, "rw")
            clients = [Client(runtime_dir, name, space.space_id) for name in names]
            try:
                for c in clients:
                    assert c.ask(f"va {mode}") == mode
                    c.ask("write0")
                samples = []
                for _ in range(n + 5):
                    t0 = time.perf_counter()
                    threads = [
                        threading.Thread(target=space.grant, args=(name, 0, PAGE, "ro"))
                        for name in names
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    samples.append(time.perf_counter() - t0)
                    outcomes = {o.outcome for r in space.revocations()[-k:] for o in r.clients}
                    assert outcomes == {"enforced" if mode == "sealed" else "acked"}, outcomes
                    for name in names:
                        space.grant(name, 0, PAGE, "rw")
                p50, p99, _ = percentiles(samples[5:])
                rows.append(
                    (
                        f"write revoke (rw -> ro), {k} client(s), {mode}, p50 / p99",
                        f"{p50:.0f} / {p99:.0f} us",
                    )
                )
            finally:
                for c in clients:
                    c.close()
            space.delete()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sealed.md")
    args = parser.parse_args()
    meter = CpuMeter()
    load0 = os.getloadavg()[0]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mb-sealed-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        daemon = Daemon(runtime_dir, metrics=True)
        try:
            rows += first_touch_rows(runtime_dir, args.reps)
            rows += random_touch_rows(daemon, runtime_dir)
            rows += write_revoke_rows(runtime_dir, 1, args.iterations)
            rows += write_revoke_rows(runtime_dir, 32, max(10, args.iterations // 6))
        finally:
            daemon.stop()
    uname = platform.uname()
    lines = [
        "# Sealed VA mode",
        "",
        f"`sealed_bench.py` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{uname.node}, Linux {uname.release}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {git_state()}, {args.reps} reps, "
        f"{args.iterations} iterations.",
        "",
        "| what | measured |",
        "|---|---:|",
        *[f"| {what} | {value} |" for what, value in rows],
        "",
        f"Load average before / after: {load0:.2f} / {os.getloadavg()[0]:.2f}; {meter.summary()}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
