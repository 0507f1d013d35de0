"""virtio-blk through the membroker bridge vs the same qemu-storage-daemon fed a plain memfd.

    .venv/bin/python bench/vhost_user_bench.py [--requests N] [--out bench/results/vhost_user.md]

4 KiB reads (null-co backend, so the numbers are the path, not a disk), p50/p99 latency and
IOPS, both ways in the same run; then the revoke round trip through the bridge (the owner's
Revoke until it returns: the pin release asked, REM_MEM_REG, the backend's maps checked, unpin,
push, ack, verification) beside a raw REM_MEM_REG round trip on the direct connection; and the
same with the vring live in the region that changes (the ring is stopped, parked, and started
again where it was, and a request is served after every revoke).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import membroker
from membroker import vhost_user as vu
from membroker._sys import memfd as sys_memfd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revoke_bench import Daemon, percentiles

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SIZE = 4 * MiB


def start_qsd(sock: Path) -> subprocess.Popen[bytes]:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon is missing: apt-get install qemu-system-common")
    proc = subprocess.Popen(
        [
            qsd,
            "--blockdev",
            "driver=null-co,node-name=null0,size=67108864,read-zeroes=on",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,"
            f"addr.path={sock},writable=on",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon did not start")
        time.sleep(0.005)
    return proc


def reads(bridge: vu.BlkBridge, n: int) -> tuple[list[float], float]:
    bridge.start_queue(0)
    for _ in range(50):
        bridge.request(vu.VIRTIO_BLK_T_IN, 0, 0x10000, 4096)
    samples = []
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        status = bridge.request(vu.VIRTIO_BLK_T_IN, (i * 8) % 100000, 0x10000, 4096)
        samples.append(time.perf_counter() - t0)
        assert status == vu.VIRTIO_BLK_S_OK
    return samples, n / (time.perf_counter() - t_all)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--revokes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vhost_user.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="membroker-vu-bench-") as tmp:
        # 1. No broker: a plain memfd table.
        sock = Path(tmp) / "direct.sock"
        qsd = start_qsd(sock)
        fd = sys_memfd.create_memfd("direct", SIZE)
        try:
            direct = vu.BlkBridge.without_broker(fd, SIZE, str(sock))
            lat, iops_direct = reads(direct, args.requests)
            rows.append(
                (
                    "4 KiB read, plain memfd table (no broker)",
                    percentiles(lat),
                    f"{iops_direct:,.0f}",
                )
            )
            direct.close()
            # REM_MEM_REG of the region holding an active vring breaks qemu-storage-daemon's
            # connection (the bridge stops and parks the ring first): the raw row uses a
            # second, quiescent connection (no vring).
            quiet = vu.BlkBridge.without_broker(fd, SIZE, str(sock))
            region = quiet.exported()[0]
            raw = []
            for _ in range(args.revokes):
                t0 = time.perf_counter()
                quiet.frontend.remove_region(region)
                raw.append(time.perf_counter() - t0)
                quiet.frontend.add_region(region, fd)
            rows.append(
                ("raw REM_MEM_REG round trip (REPLY_ACK, no active vring)", percentiles(raw), "")
            )
            quiet.close()
        finally:
            os.close(fd)
            qsd.send_signal(signal.SIGTERM)
            qsd.wait(10)
        # 2. Through the broker and the bridge.
        sock = Path(tmp) / "bridge.sock"
        qsd = start_qsd(sock)
        daemon = Daemon(Path(tmp) / "rt")
        try:
            with (
                membroker.connect("bench-owner", daemon.runtime_dir) as owner,
                membroker.connect("bridge", daemon.runtime_dir) as bs,
            ):
                space = owner.create_space(SIZE)
                space.share(0, SIZE)
                space.grant("bridge", 0, SIZE)
                bridge = vu.BlkBridge(bs, space.space_id, str(sock))
                lat, iops_bridge = reads(bridge, args.requests)
                rows.append(
                    (
                        "4 KiB read, through the membroker bridge",
                        percentiles(lat),
                        f"{iops_bridge:,.0f}",
                    )
                )
                # The vring lives in [0, SIZE/2): revoking the upper half removes its region
                # (the backend maps regions from file offset 0) and adds [0, SIZE/2) back.
                live = []
                half = SIZE // 2
                for _ in range(args.revokes):
                    t0 = time.perf_counter()
                    report = space.revoke("bridge", half, half)
                    live.append(time.perf_counter() - t0)
                    assert report.all_acked, report
                    assert bridge.request(vu.VIRTIO_BLK_T_IN, 0, 0x10000, 4096) == 0
                    space.grant("bridge", half, half)
                    assert bridge.refresh() == []
                rows.append(
                    (
                        "Revoke through the bridge, live vring in the region (owner's call)",
                        percentiles(live),
                        "",
                    )
                )
                bridge.close()
                quiet_bridge = vu.BlkBridge(bs, space.space_id, str(sock))
                rev = []
                for _ in range(args.revokes):
                    t0 = time.perf_counter()
                    report = space.revoke("bridge", 0, SIZE)
                    rev.append(time.perf_counter() - t0)
                    assert report.all_acked, report
                    space.grant("bridge", 0, SIZE)
                    quiet_bridge.refresh()
                rows.append(
                    (
                        "Revoke through the bridge, no active vring (owner's call)",
                        percentiles(rev),
                        "",
                    )
                )
                quiet_bridge.close()
        finally:
            daemon.stop()
            qsd.send_signal(signal.SIGTERM)
            qsd.wait(10)
    lines = ["| what | p50 µs | p99 µs | mean µs | IOPS |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {p[0]:.0f} | {p[1]:.0f} | {p[2]:.0f} | {i} |" for n, p, i in rows]
    revoke = rows[4][1][0]
    raw_p50 = rows[1][1][0]
    lines += [
        "",
        f"IOPS through the bridge: {iops_bridge / iops_direct:.1%} of the plain table "
        f"(target: within 5 %).",
        f"Revoke through the bridge p50 {revoke:.0f} µs = {revoke / raw_p50:.1f}x a raw "
        f"REM_MEM_REG round trip ({raw_p50:.0f} µs; target: within 2x).",
    ]
    table = "\n".join(lines)
    print(table)
    header = (
        f"# virtio-blk through the bridge\n\n`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`"
        f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Linux "
        f"{platform.release()}, {os.cpu_count()} CPUs, qemu-storage-daemon null-co.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
