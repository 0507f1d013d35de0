"""A client with tens of thousands of mappings against the daemon's event loop: the broker reads
a client's whole /proc/PID/maps to verify it (every mapping of the space, wherever it is), and
the kernel writes that text at ~1.2 us a line. Read on the event loop, a hostile client with
60,000 lines would stall every other client for tens of milliseconds per read (issue 7: no
client can degrade the service for the others).

    .venv/bin/python bench/vma_hog_bench.py [--vmas 30000] [--revokes 30]
        [--out bench/results/vma_hog.md]

For a plain client process (bench/_hog.py with no extra mappings) and one with --vmas extra
mappings (twice as many maps lines), each against a fresh daemon (MEMBROKER_LOOP_PROBE_MS=1,
verification on): --revokes revocations of its one granted page (it unmaps honestly; p50 of
the owner's call), then a detach that keeps the mapping (fenced, polled during fence_grace_ms,
killed). Beside each: the daemon's event-loop lag max (its 1 ms probe,
membroker_event_loop_lag_max_seconds) over the revocations and over the fence, and the
baseline: reading that process's maps text once here, p50 of 5.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from revoke_bench import SRC_PATH, Daemon, write_results

import membroker

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def lag_max_ms(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(r"^membroker_event_loop_lag_max_seconds (\S+)", text, re.M)
    assert found is not None, "no lag gauge"
    return float(found.group(1)) * 1000


def maps_read_us(pid: int) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        with open(f"/proc/{pid}/maps", "rb") as f:
            f.read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def scenario(vmas: int, revokes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="membroker-hog-") as tmp:
        rt = Path(tmp)
        daemon = Daemon(rt, verify="always", metrics=True, env={"MEMBROKER_LOOP_PROBE_MS": "1"})
        assert daemon.metrics_url
        hog = None
        try:
            with membroker.connect("vmm", rt) as owner:
                space = owner.create_space(1 << 20)
                space.share(0, 1 << 20)
                space.grant("hog", 0, PAGE)
                script = str(ROOT / "bench" / "_hog.py")
                hog = subprocess.Popen(
                    [sys.executable, script, tmp, space.space_id, str(vmas)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=dict(os.environ, PYTHONPATH=SRC_PATH),
                    text=True,
                )
                assert hog.stdin is not None and hog.stdout is not None
                ready = hog.stdout.readline().split()
                assert ready and ready[0] == "ready", ready
                lines = int(ready[1])
                read_us = maps_read_us(hog.pid)
                time.sleep(0.3)
                before = lag_max_ms(daemon.metrics_url)
                walls = []
                for _ in range(revokes):
                    t0 = time.perf_counter()
                    report = space.revoke("hog", 0, PAGE)
                    walls.append(time.perf_counter() - t0)
                    assert [c.outcome for c in report.clients] == ["acked"], report
                    space.grant("hog", 0, PAGE)
                    hog.stdin.write("remap\n")
                    hog.stdin.flush()
                    assert hog.stdout.readline().strip() == "ok"
                revoke_lag = lag_max_ms(daemon.metrics_url)
                hog.stdin.write("detach\n")
                hog.stdin.flush()
                rc = hog.wait(30)
                assert rc == -9, f"the liar was not killed (rc {rc})"
                time.sleep(0.2)
                fence_lag = lag_max_ms(daemon.metrics_url)
                return {
                    "lines": lines,
                    "read_us": read_us,
                    "revoke_p50_us": statistics.median(walls) * 1e6,
                    "lag_before_ms": before,
                    "lag_revokes_ms": revoke_lag,
                    "lag_fence_ms": fence_lag,
                }
        finally:
            if hog is not None and hog.poll() is None:
                hog.kill()
                hog.wait(10)
            daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vmas", type=int, default=30000)
    parser.add_argument("--revokes", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vma_hog.md")
    args = parser.parse_args()
    rows = []
    for label, vmas in (
        ("plain client", 0),
        (f"client with {args.vmas} extra mappings", args.vmas),
    ):
        r = scenario(vmas, args.revokes)
        rows.append(
            f"| {label} | {r['lines']:.0f} | {r['read_us']:.0f} | {r['revoke_p50_us']:.0f} | "
            f"{r['lag_before_ms']:.0f} | {r['lag_revokes_ms']:.0f} | {r['lag_fence_ms']:.0f} |"
        )
    table = "\n".join(
        [
            "| client | maps lines | baseline: one maps read here, µs | revoke p50 µs | "
            "loop lag max before, ms | after the revokes, ms | after the fence, ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    write_results(
        args.out,
        "A client with many mappings against the event loop",
        f"; {args.revokes} revokes each. The lag columns are the daemon's largest probe lag "
        "since it started (1 ms probe), read after each phase.",
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
