"""virtio-blk through the membroker bridge vs the same qemu-storage-daemon fed a plain memfd.

    .venv/bin/python bench/vhost_user_bench.py [--requests N] [--out bench/results/vhost_user.md]

4 KiB reads (null-co backend, so the numbers are the path, not a disk), p50/p99 latency and
IOPS, both ways in the same run; then the revoke round trip through the bridge (the owner's
Revoke until it returns: the pin release asked, REM_MEM_REG, the backend's maps checked, unpin,
push, ack, verification) beside a raw REM_MEM_REG round trip on the direct connection; and the
same with the vring live in the region that changes (the ring is stopped, parked, and started
again where it was, and a request is served after every revoke).

virtio-net through DPDK testpmd (io forwarding back to the same vhost port): packets/s of 64-byte
frames sent on the TX ring and received back on the RX ring, through the bridge attached to
the broker and through the same driver over a plain memfd, in the same run against the same
testpmd. With an IOTLB (testpmd iommu-support=1): the owner's Revoke through the bridge (an
IOTLB INVALIDATE the backend acknowledges, then the table, the backend's maps, the ack) beside
a raw IOTLB_MSG INVALIDATE round trip plus one session-socket round trip.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import membroker
from membroker import vhost_net as vn
from membroker import vhost_user as vu
from membroker._sys import memfd as sys_memfd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from revoke_bench import Daemon, percentiles

from tests.peers.testpmd import DpdkTestpmd

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20
SIZE = 4 * MiB
_T = TypeVar("_T")
_BR = TypeVar("_BR", bound=vu.Bridge)


class Parts:
    """Time spent in the bridge's own steps during timed revokes (`on`), as a tree of steps
    (seconds, summed by path): `rows(n, total)` gives the mean per revoke of each, and what
    a step spent outside the steps inside it."""

    def __init__(self) -> None:
        self.spent: dict[tuple[str, ...], float] = {}
        self.on = False
        self._path: tuple[str, ...] = ()

    def timed(self, name: str, fn: Callable[[], _T]) -> _T:
        outer = self._path
        self._path = (*outer, name)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            if self.on:
                self.spent[self._path] = self.spent.get(self._path, 0.0) + (
                    time.perf_counter() - t0
                )
            self._path = outer

    def rows(self, n: int, total: float) -> list[tuple[str, tuple[float, float, float], str]]:
        nan = float("nan")

        def mean(seconds: float) -> tuple[float, float, float]:
            return (nan, nan, seconds / n * 1e6)

        def tree(path: tuple[str, ...]) -> list[tuple[str, tuple[float, float, float], str]]:
            out = []
            kids = [k for k in self.spent if len(k) == len(path) + 1 and k[: len(path)] == path]
            for kid in kids:
                out.append((f"{'  ' * len(kid)}{kid[-1]}", mean(self.spent[kid]), ""))
                out += tree(kid)
            if path and kids:
                rest = self.spent[path] - sum(self.spent[k] for k in kids)
                out.append((f"{'  ' * (len(path) + 1)}the rest of it", mean(rest), ""))
            return out

        inside = sum(t for k, t in self.spent.items() if len(k) == 1)
        return [
            *tree(()),
            (
                "  the broker, the session, the owner's call",
                (nan, nan, total - inside / n * 1e6),
                "",
            ),
        ]


def timed_class(base: type[_BR], parts: Parts) -> type[_BR]:
    """`base` with its revocation steps timed into `parts` (the same code, measured)."""

    class Timed(base):  # type: ignore[valid-type,misc]
        def _on_release(self, ranges: list[tuple[int, int]]) -> None:
            parts.timed("bridge: pin release", lambda: super(Timed, self)._on_release(ranges))

        def _on_revoke(self, ranges: list[Any]) -> None:
            parts.timed("bridge: revoke, to the ack", lambda: super(Timed, self)._on_revoke(ranges))

        def _retract(self, cut: Any, full: bool = True) -> Any:
            return parts.timed(
                "taking it from the backend", lambda: super(Timed, self)._retract(cut, full)
            )

        def _invalidate(self, cut: Any) -> None:
            parts.timed("IOTLB INVALIDATE", lambda: super(Timed, self)._invalidate(cut))

        def _publish_table(self) -> None:
            parts.timed("SET_MEM_TABLE", lambda: super(Timed, self)._publish_table())

        def _space_vmas(self) -> Any:
            return parts.timed("full maps reads", lambda: super(Timed, self)._space_vmas())

        def _still_at(self, before: Any, spans: Any) -> Any:
            return parts.timed(
                "PROCMAP_QUERY checks", lambda: super(Timed, self)._still_at(before, spans)
            )

    return Timed


def time_frontend(bridge: vu.Bridge, parts: Parts) -> None:
    """The bridge's vhost-user round trips that change regions or rings, timed into `parts`."""
    front = bridge.frontend
    steps = {
        "remove_region": "REM_MEM_REG",
        "add_region": "ADD_MEM_REG",
        "get_vring_base": "GET_VRING_BASE",
        "set_vring_addr": "SET_VRING_ADDR",
        "setup_vring": "vring set-up (6 messages)",
    }
    for attr, name in steps.items():
        real = getattr(front, attr)

        def step(*a: Any, _real: Any = real, _name: str = name) -> Any:
            return parts.timed(_name, lambda: _real(*a))

        setattr(front, attr, step)


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


NET_BUF = 2048
RX_AT, TX_AT = MiB, MiB + 256 * 1024
FRAME = bytes.fromhex("020000000002020000000001") + b"\x88\xb5" + bytes(range(50))


def net_rate(bridge: vn.NetBridge, n: int, batch: int = 32) -> float:
    """Packets/s: batches sent on the TX ring, forwarded back by testpmd, received on the
    RX ring (each buffer posted again), until n packets have come back."""
    bridge.start_queues(0)
    for i in range(bridge.QUEUE_SIZE):
        bridge.post_rx(RX_AT + i * NET_BUF, NET_BUF)

    def one_batch() -> int:
        for i in range(batch):
            bridge.send(TX_AT + i * NET_BUF, FRAME)
        got = bridge.receive(batch, timeout=5)
        for p in got:
            assert p.frame == FRAME, p
            bridge.post_rx(p.gpa, NET_BUF)
        if len(got) < batch:
            raise RuntimeError(f"{batch - len(got)} of {batch} packets did not come back")
        return len(got)

    for _ in range(20):
        one_batch()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        done += one_batch()
    return done / (time.perf_counter() - t0)


def net_bench(
    tmp: Path, args: argparse.Namespace
) -> tuple[
    list[tuple[str, tuple[float, float, float], str]], float, float, tuple[float, float, float]
]:
    """Net packets/s without and with the broker (one testpmd), then the IOTLB rows (a
    testpmd with iommu-support=1)."""
    rows: list[tuple[str, tuple[float, float, float], str]] = []
    nothing = (float("nan"),) * 3
    parts = Parts()
    fd = sys_memfd.create_memfd("direct-net", SIZE)
    pmd = DpdkTestpmd(tmp)
    daemon = Daemon(tmp / "rt-net")
    try:
        pmd.start()
        direct = vn.NetBridge.without_broker(fd, SIZE, str(pmd.sock))
        pps_direct = net_rate(direct, args.packets)
        direct.close()
        rows.append(
            (
                "net 64 B frames via testpmd, plain memfd table (no broker)",
                nothing,
                f"{pps_direct:,.0f}",
            )
        )
        with (
            membroker.connect("bench-owner", daemon.runtime_dir) as owner,
            membroker.connect("bridge", daemon.runtime_dir) as bs,
        ):
            space = owner.create_space(SIZE)
            space.share(0, SIZE)
            space.grant("bridge", 0, SIZE)
            bridge = vn.NetBridge(bs, space.space_id, str(pmd.sock))
            pps_bridge = net_rate(bridge, args.packets)
            bridge.close()
            rows.append(
                (
                    "net 64 B frames via testpmd, through the membroker bridge",
                    nothing,
                    f"{pps_bridge:,.0f}",
                )
            )
    finally:
        pmd.stop()
        daemon.stop()
        os.close(fd)
    # IOTLB: raw INVALIDATE round trips on a direct connection, then revokes through the broker.
    pmd = DpdkTestpmd(tmp, iommu=True)
    daemon = Daemon(tmp / "rt-iotlb")
    fd = sys_memfd.create_memfd("direct-iotlb", SIZE)
    half = SIZE // 2
    try:
        pmd.start()
        direct = vn.NetBridge.without_broker(fd, SIZE, str(pmd.sock), iommu=True)
        region = direct.exported()[0]
        raw = []
        for _ in range(args.revokes):
            direct.frontend.iotlb(vu.IOTLB_UPDATE, half, half, region.uaddr + half, vu.IOTLB_RW)
            t0 = time.perf_counter()
            direct.frontend.iotlb(vu.IOTLB_INVALIDATE, half, half)
            raw.append(time.perf_counter() - t0)
        raw_p = percentiles(raw)
        rows.append(("raw IOTLB_MSG INVALIDATE round trip (REPLY_ACK)", raw_p, ""))
        # The parts of a revoke that are the backend's and the kernel's: a new table (DPDK
        # unmaps and maps its regions again) and one full read of testpmd's maps.
        park = direct._park_region
        lower = vu.MemRegion(0, half, region.uaddr, 0)
        tables = [[park, region], [park, lower]]
        table_rt = []
        for i in range(args.revokes):
            t0 = time.perf_counter()
            direct.frontend.set_mem_table(tables[i % 2], [direct._park_fd, fd])
            table_rt.append(time.perf_counter() - t0)
        rows.append(
            ("raw SET_MEM_TABLE round trip (testpmd, 2 regions)", percentiles(table_rt), "")
        )
        st = os.fstat(fd)
        scans = []
        for _ in range(args.revokes):
            t0 = time.perf_counter()
            direct.backend.mappings_of(st.st_dev, st.st_ino)
            scans.append(time.perf_counter() - t0)
        rows.append(("one full read of testpmd's /proc/PID/maps", percentiles(scans), ""))
        # What releasing a pin asks instead: PROCMAP_QUERY over the addresses where testpmd
        # mapped the space (its region mappings, known from the last full read).
        vmas = direct.backend.mappings_of(st.st_dev, st.st_ino)
        queries = []
        for _ in range(args.revokes):
            t0 = time.perf_counter()
            for v in vmas:
                direct.backend.file_mappings_in(v.start, v.end)
            queries.append(time.perf_counter() - t0)
        rows.append(
            (
                f"PROCMAP_QUERY over testpmd's {len(vmas)} mapping(s) of the space",
                percentiles(queries),
                "",
            )
        )
        direct.close()
        with (
            membroker.connect("bench-owner", daemon.runtime_dir) as owner,
            membroker.connect("bridge", daemon.runtime_dir) as bs,
        ):
            pings = [owner.ping() for _ in range(args.revokes)]
            ping_p = percentiles(pings)
            rows.append(("session-socket round trip (ping)", ping_p, ""))
            space = owner.create_space(SIZE)
            space.share(0, SIZE)
            space.grant("bridge", 0, SIZE)
            bridge = timed_class(vn.NetBridge, parts)(bs, space.space_id, str(pmd.sock), iommu=True)
            time_frontend(bridge, parts)
            net_rate(bridge, 64 * 20)
            rev = []
            n_reads = 0
            for _ in range(args.revokes):
                before = bridge.full_reads
                parts.on = True
                t0 = time.perf_counter()
                report = space.revoke("bridge", half, half)
                rev.append(time.perf_counter() - t0)
                parts.on = False
                n_reads += bridge.full_reads - before
                assert report.all_acked, report
                # Traffic still flows (rings restarted, misses served from the grants).
                bridge.send(TX_AT, FRAME)
                (p,) = bridge.receive(1, timeout=5)
                bridge.post_rx(p.gpa, NET_BUF)
                space.grant("bridge", half, half)
                assert bridge.refresh() == []
            inval = [
                float(outcome.split()[2]) / 1e6
                for _, what, _, _, outcome in bridge.iotlb_log
                if what == "invalidate"
            ]
            bridge.close()
            rev_p = percentiles(rev)
            rows.append(
                ("Revoke with IOTLB through the bridge, live rings (owner's call)", rev_p, "")
            )
            rows.append(("  of which the INVALIDATE round trip inside it", percentiles(inval), ""))
            rows += parts.rows(args.revokes, rev_p[2])
            rows.append(
                (
                    f"  full reads of testpmd's maps per revoke: {n_reads / args.revokes:.2f}",
                    nothing,
                    "",
                )
            )
    finally:
        pmd.stop()
        daemon.stop()
        os.close(fd)
    return rows, pps_direct, pps_bridge, (rev_p[0], raw_p[0], ping_p[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--revokes", type=int, default=100)
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vhost_user.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
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
                blk_parts = Parts()
                quiet_bridge = timed_class(vu.BlkBridge, blk_parts)(bs, space.space_id, str(sock))
                time_frontend(quiet_bridge, blk_parts)
                blk_reads = 0
                rev = []
                for _ in range(args.revokes):
                    before = quiet_bridge.full_reads
                    blk_parts.on = True
                    t0 = time.perf_counter()
                    report = space.revoke("bridge", 0, SIZE)
                    rev.append(time.perf_counter() - t0)
                    blk_parts.on = False
                    blk_reads += quiet_bridge.full_reads - before
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
                rows += blk_parts.rows(args.revokes, percentiles(rev)[2])
                rows.append(
                    (
                        "  full reads of qemu-storage-daemon's maps per revoke: "
                        f"{blk_reads / args.revokes:.2f}",
                        (float("nan"),) * 3,
                        "",
                    )
                )
                quiet_bridge.close()
        finally:
            daemon.stop()
            qsd.send_signal(signal.SIGTERM)
            qsd.wait(10)
        net_rows, pps_direct, pps_bridge, iotlb = net_bench(Path(tmp), args)
    rows += net_rows
    load_after = os.getloadavg()
    lines = ["| what | p50 µs | p99 µs | mean µs | IOPS / packets/s |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {n} | {' | '.join('' if math.isnan(x) else f'{x:.0f}' for x in p)} | {i} |"
        for n, p, i in rows
    ]
    revoke = rows[4][1][0]
    raw_p50 = rows[1][1][0]
    inval_revoke, raw_inval, ping = iotlb
    parts = {name: p[0] for name, p, _ in rows}
    table_p50 = parts["raw SET_MEM_TABLE round trip (testpmd, 2 regions)"]
    scan_p50 = parts["one full read of testpmd's /proc/PID/maps"]
    query_p50 = next(p[0] for name, p, _ in rows if name.startswith("PROCMAP_QUERY over"))
    lines += [
        "",
        f"IOPS through the bridge: {iops_bridge / iops_direct:.1%} of the plain table "
        f"(target: within 5 %).",
        f"Revoke through the bridge p50 {revoke:.0f} µs = {revoke / raw_p50:.1f}x a raw "
        f"REM_MEM_REG round trip ({raw_p50:.0f} µs; target: within 2x).",
        f"Net packets/s through the bridge: {pps_bridge / pps_direct:.1%} of the plain table "
        "(target: at least 90 %).",
        f"Revoke with IOTLB through the bridge p50 {inval_revoke:.0f} µs = "
        f"{inval_revoke / (raw_inval + ping):.1f}x (a raw IOTLB_MSG INVALIDATE round trip "
        f"{raw_inval:.0f} µs + one session round trip {ping:.0f} µs; target: within 2x).",
        "",
        "Where a revoke with an IOTLB against testpmd goes (the indented rows: means per "
        "revoke, measured inside the bridge in the same revokes): the INVALIDATE is "
        f"acknowledged in ~{raw_inval:.0f} µs, but testpmd (DPDK 22.11) maps every region "
        "from file offset 0 and has no CONFIGURE_MEM_SLOTS, so releasing the pin sends a new "
        f"table (~{table_p50:.0f} µs in testpmd), asks the kernel (PROCMAP_QUERY, "
        f"~{query_p50:.0f} µs) that nothing of the range is mapped where testpmd had the "
        "space (the last full read, no message since), and unpins (a gRPC call the broker "
        "answers); the acknowledgement then reads testpmd's whole maps once "
        f"(~{scan_p50:.0f} µs: a mapping of the range anywhere in testpmd refuses it); the "
        "rest is the broker's (gRPC in and out, the release and revoke pushes and their "
        "acks, its verification of the bridge's own process, the journal).",
    ]
    table = "\n".join(lines)
    print(table)
    header = (
        f"# vhost-user through the bridge\n\n`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`"
        f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Linux "
        f"{platform.release()}, {os.cpu_count()} CPUs, qemu-storage-daemon null-co, DPDK "
        f"testpmd (io forwarding). Load average (1, 5, 15 min) before: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{' '.join(f'{x:.2f}' for x in load_after)}.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
