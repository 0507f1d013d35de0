"""The VaClient data plane beside memcpy, measured in the same run (issue 9, item 5).

    .venv/bin/python bench/dataplane_bench.py [--mib 64] [--out bench/results/dataplane.md]

A real daemon and a real VaClient in a process of its own (sealed mode where the kernel
offers it), its whole 64 MiB space granted and faulted in first: then read (new bytes),
readinto (a buffer of the caller's), and write from bytes, bytearray and memoryview, each the
best of 7, against a memcpy of the same size between two anonymous buffers in that process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from revoke_bench import SRC_PATH, CpuMeter, Daemon, git_state

import membroker

ROOT = Path(__file__).resolve().parent.parent

CLIENT = r"""
import json, sys, time
import membroker

def best(fn, reps=7):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    return min(out)

runtime_dir, space_id, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with membroker.connect("dp", runtime_dir) as session:
    va = session.attach_va(space_id)
    va.readinto(0, bytearray(size))  # fault everything in
    src, dst = bytearray(size), bytearray(size)
    dst_view, src_bytes, src_view = memoryview(dst), bytes(src), memoryview(src)
    dst_view[:] = src  # the buffers' own pages, faulted in before the clock runs
    rows = {
        "memcpy, anonymous buffer to buffer": best(lambda: dst_view.__setitem__(slice(None), src)),
        "VaClient.read (new bytes)": best(lambda: va.read(0, size)),
        "VaClient.readinto (caller's buffer)": best(lambda: va.readinto(0, dst)),
        "VaClient.write from bytes": best(lambda: va.write(0, src_bytes)),
        "VaClient.write from bytearray": best(lambda: va.write(0, src)),
        "VaClient.write from memoryview": best(lambda: va.write(0, src_view)),
    }
    print(json.dumps({"mode": va.mode, "rows": rows}))
    va.close()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dataplane.md")
    args = parser.parse_args()
    size = args.mib << 20
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="mb-dataplane-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        daemon = Daemon(runtime_dir)
        try:
            with membroker.connect("bench-owner", runtime_dir) as owner:
                space = owner.create_space(size)
                space.share(0, size)
                space.grant("dp", 0, size, "rw")
                out = subprocess.run(
                    [sys.executable, "-c", CLIENT, str(runtime_dir), space.space_id, str(size)],
                    env=dict(os.environ, PYTHONPATH=SRC_PATH),
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                space.delete()
        finally:
            daemon.stop()
    result = json.loads(out.stdout)
    rows = result["rows"]
    base = rows["memcpy, anonymous buffer to buffer"]
    uname = platform.uname()
    lines = [
        "# VaClient data plane",
        "",
        f"`dataplane_bench.py` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{uname.node}, Linux {uname.release}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {git_state()}; {args.mib} MiB, best of 7, client in "
        f"{result['mode']} mode.",
        "",
        "| what | GB/s | vs memcpy (goal >= 0.95) |",
        "|---|---:|---:|",
        *[
            f"| {name} | {size / secs / 1e9:.1f} | {base / secs:.2f} |"
            for name, secs in rows.items()
        ],
        "",
        meter.summary(),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
