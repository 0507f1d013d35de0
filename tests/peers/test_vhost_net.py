"""The vhost-user bridge as a virtio-net device against a real DPDK testpmd (PEERS.md): TX and
RX split rings in broker memory, packets forwarded back by testpmd and checked byte for byte,
revocations under traffic, the device class checked at negotiation, and the IOTLB (vIOMMU)
fed from grants."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import membroker
from membroker import vhost_net as vn
from membroker import vhost_user as vu
from membroker._sys.proc import ProcessView
from tests.conftest import PeerProc, _env, wait_until
from tests.peers.testpmd import TESTPMD, DpdkTestpmd

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        TESTPMD is None,
        reason="dpdk-testpmd is not installed (bash deploy/install-test-deps.sh installs "
        "dpdk-dev librte-net-vhost23 librte-mempool-ring23)",
    ),
]
BRIDGE = Path(__file__).with_name("bridge_proc.py")
MiB = 1 << 20
BUF = 2048
RX_AT, TX_AT = MiB, MiB + 256 * 1024
MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
# What the device writes in front of a received frame: no offloads, num_buffers = 1.
RX_HEADER = vn.NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)


def frame(i: int, size: int = 60) -> bytes:
    """An Ethernet frame A -> B (an experimental ethertype) whose payload names it."""
    payload = bytes((i * 31 + k) & 0xFF for k in range(size - 14))
    return MAC_B + MAC_A + b"\x88\xb5" + payload


def swapped(f: bytes) -> bytes:
    return f[6:12] + f[0:6] + f[12:]


class World:
    def __init__(self, daemon, tmp: Path, *, iommu: bool = False, mode: str = "io") -> None:
        self._stack = contextlib.ExitStack()
        # Whatever fails to start, what did start is ended (testpmd by its pid).
        with self._stack as stack:
            self.testpmd = DpdkTestpmd(tmp, iommu=iommu, mode=mode)
            stack.callback(self.testpmd.stop)
            self.owner = membroker.connect("vmm", daemon.runtime_dir)
            stack.callback(self.owner.close)
            self.space = self.owner.create_space(4 * MiB)
            stack.callback(self.space.close)
            self.mem = self.space.map()
            stack.callback(self.mem.close)
            self.bridge = PeerProc(BRIDGE, daemon.runtime_dir, "bridge")
            stack.callback(self.bridge.close)
            self._stack = stack.pop_all()

    def start(self, **kw) -> dict:
        return self.bridge.ok(
            "start", space=self.space.space_id, socket=str(self.testpmd.sock), device="net", **kw
        )

    def testpmd_maps(self) -> list[tuple[int, int]]:
        st = os.fstat(self.space.fd)
        view = ProcessView(self.testpmd.pid)
        try:
            return [(v.offset, v.file_end) for v in view.mappings_of(st.st_dev, st.st_ino)]
        finally:
            view.close()

    def testpmd_maps_at(self) -> list[tuple[int, int, int]]:
        """testpmd's mappings of the space as (start address, file offset, file end)."""
        st = os.fstat(self.space.fd)
        view = ProcessView(self.testpmd.pid)
        try:
            vmas = view.mappings_of(st.st_dev, st.st_ino)
            return [(v.start, v.offset, v.file_end) for v in vmas]
        finally:
            view.close()

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def world(daemon, tmp_path):
    w = World(daemon, tmp_path)
    yield w
    w.close()


@pytest.fixture
def iommu_world(daemon, tmp_path):
    w = World(daemon, tmp_path, iommu=True)
    yield w
    w.close()


def round_trip(w: World, frames: list[bytes]) -> list[tuple[int, bytes]]:
    for i, f in enumerate(frames):
        w.bridge.ok("send", gpa=TX_AT + i * BUF, frame=f.hex())
    got = w.bridge.ok("receive", count=len(frames), wait=5)["packets"]
    return [(gpa, bytes.fromhex(data)) for gpa, data in got]


@pytest.mark.parametrize("mode", ["io", "macswap"])
def test_net_packets_round_trip_through_testpmd_byte_for_byte(daemon, tmp_path, mode):
    w = World(daemon, tmp_path, mode=mode)
    try:
        w.space.share(0, 4 * MiB)
        w.space.grant("bridge", 0, 4 * MiB)
        started = w.start()
        assert started["backend_pid"] == w.testpmd.pid
        features = started["features"]
        assert features & vu.VIRTIO_F_VERSION_1 and features & vu.VIRTIO_NET_F_MRG_RXBUF
        # None of virtio-blk's bits (BLK_SIZE, FLUSH would be GSO, GUEST_ECN here).
        assert features & (vu.VIRTIO_BLK_F_BLK_SIZE | vu.VIRTIO_BLK_F_FLUSH) == 0
        assert started["protocol_features"] == vu.PROTOCOL_F_REPLY_ACK  # no MEM_SLOTS
        assert started["mem_slots"] is False
        assert started["prefix_mapping"] is True
        w.bridge.ok("net_queues", gpa=0)
        rx = [RX_AT + i * BUF for i in range(16)]
        w.mem.write(RX_AT, b"\xee" * 16 * BUF)
        for gpa in rx:
            w.bridge.ok("post_rx", gpa=gpa, length=BUF)
        w.testpmd.start()
        frames = [frame(i, 60 + 97 * i) for i in range(8)]
        got = round_trip(w, frames)
        expect = frames if mode == "io" else [swapped(f) for f in frames]
        # In ring order, into the buffers posted first, header then frame exactly.
        assert [gpa for gpa, _ in got] == rx[:8]
        assert [data[: vn.HDR_LEN] for _, data in got] == [RX_HEADER] * 8
        assert [data[vn.HDR_LEN :] for _, data in got] == expect
        # Written by the backend straight into broker memory: the owner sees the same bytes,
        # and nothing past the packet.
        for (gpa, data), f in zip(got, expect, strict=True):
            assert w.mem.read(gpa, len(data) + 1) == RX_HEADER + f + b"\xee"
        flight = w.bridge.ok("in_flight")
        assert flight["rx"] == [[gpa, BUF] for gpa in rx[8:]]
        assert flight["tx"] == []
    finally:
        w.close()


def test_a_bridge_of_one_device_class_refuses_a_backend_of_another(daemon, tmp_path):
    """testpmd is a net device: a blk bridge would offer it BLK_SIZE and FLUSH, which it
    reads as GSO and GUEST_ECN. Refused at negotiation, before any feature is set, with the
    reason; and a net bridge refuses qemu-storage-daemon's blk device the same way."""
    from tests.peers.test_vhost_user import QSD, Qsd

    w = World(daemon, tmp_path)
    try:
        w.space.share(0, MiB)
        w.space.grant("bridge", 0, MiB)
        refused = w.bridge.cmd(
            "start", space=w.space.space_id, socket=str(w.testpmd.sock), device="blk"
        )
        assert not refused["ok"]
        assert "is a virtio-net device" in refused["error"]
        assert "this bridge drives virtio-blk: refused" in refused["error"]
        assert w.owner.get_space(w.space.space_id).attachments == 0
        if QSD is None:
            pytest.skip("qemu-storage-daemon is not installed: the blk half is not tried")
        qsd = Qsd(tmp_path)
        try:
            refused = w.bridge.cmd(
                "start", space=w.space.space_id, socket=str(qsd.sock), device="net"
            )
            assert not refused["ok"]
            assert "is a virtio-blk device" in refused["error"]
            assert "this bridge drives virtio-net: refused" in refused["error"]
            assert qsd.maps_of(w.space.fd) == []
        finally:
            qsd.stop()
        # The same bridge process then drives the right device.
        assert w.start()["backend_pid"] == w.testpmd.pid
    finally:
        w.close()


def test_a_revoke_under_traffic_takes_rx_buffers_off_the_ring(world):
    """Receive buffers below 2 MiB and above it are on the ring when [2 MiB, 4 MiB) is
    revoked between packets: the ring is stopped, the buffers into the revoked memory are
    taken off it (the bridge says which), the rest keep their order, and the backend never
    writes into the revoked memory; traffic goes on into what is still granted."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    low = [RX_AT + i * BUF for i in range(4)]
    high = [3 * MiB + i * BUF for i in range(4)]
    w.mem.write(3 * MiB, b"\xee" * 4 * BUF)
    for gpa in low[:2] + high + low[2:]:
        w.bridge.ok("post_rx", gpa=gpa, length=BUF)
    w.testpmd.start()
    got = round_trip(w, [frame(0), frame(1)])
    assert [gpa for gpa, _ in got] == low[:2]
    report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
    assert [(c.outcome, c.withdrawn) for c in report.clients] == [("acked", ())]
    assert w.bridge.ok("exported")["regions"] == [[0, 2 * MiB, 0]]
    assert w.testpmd_maps() == [(0, 2 * MiB)]
    (rev,) = w.bridge.ok("revocations")["revocations"]
    assert rev["cut"] == [[2 * MiB, 4 * MiB]]
    assert rev["taken_off"] == [[vn.RX, gpa, BUF] for gpa in high]
    assert rev["in_backend"] == []
    assert w.bridge.ok("in_flight")["rx"] == [[gpa, BUF] for gpa in low[2:]]
    # Buffers into revoked memory are refused by the bridge itself from now on.
    refused = w.bridge.cmd("post_rx", gpa=high[0], length=BUF)
    assert not refused["ok"] and "not in memory exported to the backend" in refused["error"]
    # The rings were restarted where they were: the next packets land in the low buffers.
    frames = [frame(7, 200), frame(8, 300)]
    got = round_trip(w, frames)
    assert [(gpa, data) for gpa, data in got] == [
        (low[2], RX_HEADER + frames[0]),
        (low[3], RX_HEADER + frames[1]),
    ]
    assert w.mem.read(3 * MiB, 4 * BUF) == b"\xee" * 4 * BUF
    assert w.owner.stats().fenced_total == 0


def test_revoking_the_rings_memory_stops_both_rings_and_the_connection_lives(world):
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    w.testpmd.start()
    assert len(round_trip(w, [frame(0)])) == 1
    t0 = time.monotonic()
    report = w.space.revoke("bridge", 0, 4 * MiB)
    assert time.monotonic() - t0 < 2.0
    assert [c.outcome for c in report.clients] == ["acked"]
    failed = w.bridge.cmd("send", gpa=TX_AT, frame=frame(1).hex())
    assert not failed["ok"] and "not in memory exported" in failed["error"]
    failed = w.bridge.cmd("receive", count=1, wait=0.1)
    assert not failed["ok"] and "vring 0 (gpa 0x0+" in failed["error"]
    assert w.testpmd.proc.poll() is None
    # Same connection, memory granted again, new rings.
    seq = w.space.grant("bridge", 0, 4 * MiB)
    assert w.bridge.ok("refresh", seq=seq)["left_out"] == []
    w.bridge.ok("net_queues", gpa=0x10000)
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    got = round_trip(w, [frame(2)])
    assert got == [(RX_AT, RX_HEADER + frame(2))]


# -- IOTLB (vIOMMU) ------------------------------------------------------------------------


def test_iotlb_misses_on_granted_memory_are_served(iommu_world):
    w = iommu_world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 2 * MiB)
    w.bridge.ok("stats")  # the session's call channel, open for its life, is open before
    fds_before = sorted(os.listdir(f"/proc/{w.bridge.pid}/fd"))
    started = w.start(iommu=True)
    assert started["features"] & vu.VIRTIO_F_ACCESS_PLATFORM
    assert started["protocol_features"] == vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_BACKEND_REQ
    w.bridge.ok("net_queues", gpa=0)
    for i in range(4):
        w.bridge.ok("post_rx", gpa=RX_AT + i * BUF, length=BUF)
    w.testpmd.start()
    frames = [frame(i, 64 + i) for i in range(4)]
    got = round_trip(w, frames)
    assert got == [(RX_AT + i * BUF, RX_HEADER + f) for i, f in enumerate(frames)]
    log = w.bridge.ok("iotlb_log")["log"]
    misses = [(iova, outcome) for _, what, iova, _, outcome in log if what == "miss"]
    # The device asked for what it needed (rings, buffers) by IOVA; all of it was granted,
    # and each miss was answered with the export holding it.
    assert misses, log
    for iova, outcome in misses:
        assert 0 <= iova < 2 * MiB or iova >= vu.PARK_GPA, (iova, outcome)
        assert outcome.startswith("served 0x0+0x200000"), (iova, outcome)
    # Closing leaves nothing: not in testpmd's maps, not attached or pinned, and no fd of the
    # bridge's (eventfds, parking page, backend channel) stays open.
    w.bridge.ok("close")
    assert w.testpmd_maps() == []
    assert w.owner.get_space(w.space.space_id).attachments == 0
    assert w.owner.list_pins(w.space.space_id) == []
    assert sorted(os.listdir(f"/proc/{w.bridge.pid}/fd")) == fds_before


def test_after_a_revoke_the_backends_iotlb_no_longer_translates_the_range(iommu_world):
    """Traffic through buffers in [2 MiB, 4 MiB) (their IOVAs translated by the backend),
    then that range is revoked: an INVALIDATE the backend acknowledged precedes the ack. A
    receive buffer then put on the ring at a revoked IOVA (bypassing the bridge's own
    check) makes the backend miss, the miss is refused, and the packet is not delivered:
    the revoked memory is untouched."""
    w = iommu_world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start(iommu=True)
    w.bridge.ok("net_queues", gpa=0)
    high = 3 * MiB
    w.bridge.ok("post_rx", gpa=high, length=BUF)
    w.testpmd.start()
    assert round_trip(w, [frame(0)]) == [(high, RX_HEADER + frame(0))]
    w.mem.write(high, b"\xee" * BUF)
    report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
    t_acked = time.monotonic()
    assert [c.outcome for c in report.clients] == ["acked"]
    log = w.bridge.ok("iotlb_log")["log"]
    inval = [
        (t, iova, size, outcome) for t, what, iova, size, outcome in log if what == "invalidate"
    ]
    assert [(iova, size) for _, iova, size, _ in inval] == [(2 * MiB, 2 * MiB)]
    assert inval[0][0] < t_acked and inval[0][3].startswith("acked")
    seen = len(log)
    w.bridge.ok("post_rx_raw", gpa=high, length=BUF)
    w.bridge.ok("send", gpa=TX_AT, frame=frame(1).hex())
    assert w.bridge.ok("receive", count=1, wait=1.0)["packets"] == []
    after = w.bridge.ok("iotlb_log")["log"][seen:]
    refused = [
        iova
        for _, what, iova, _, outcome in after
        if what == "miss" and outcome.startswith("refused")
    ]
    assert refused and all(2 * MiB <= iova < 4 * MiB for iova in refused), after
    assert not [
        e for e in after if e[1] == "miss" and e[4].startswith("served") and e[2] >= 2 * MiB
    ]
    assert w.mem.read(high, BUF) == b"\xee" * BUF


def test_iommu_is_refused_clearly_by_a_backend_without_an_iotlb(world):
    """testpmd without iommu-support=1 offers no VIRTIO_F_ACCESS_PLATFORM: a bridge asked
    for an IOTLB refuses it at negotiation (never a bridge that silently runs without one)."""
    w = world
    w.space.share(0, MiB)
    w.space.grant("bridge", 0, MiB)
    refused = w.bridge.cmd(
        "start", space=w.space.space_id, socket=str(w.testpmd.sock), device="net", iommu=True
    )
    assert not refused["ok"]
    assert "offers no IOTLB (missing VIRTIO_F_ACCESS_PLATFORM" in refused["error"]
    assert w.owner.get_space(w.space.space_id).attachments == 0
    assert w.start()["features"] & vu.VIRTIO_F_ACCESS_PLATFORM == 0


def test_a_killed_testpmd_is_noticed_at_once_and_everything_released(world):
    w = world
    w.space.share(0, MiB)
    w.space.grant("bridge", 0, MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    assert len(w.owner.list_pins(w.space.space_id)) == 1
    t_kill = time.monotonic()
    os.kill(w.testpmd.pid, signal.SIGKILL)
    watched = w.bridge.ok("watch", timeout=5)
    assert watched["gone"] is True and "hung up" in watched["reason"]
    assert watched["gone_at"] - t_kill < 0.1
    assert w.owner.list_pins(w.space.space_id) == []
    failed = w.bridge.cmd("post_rx", gpa=RX_AT, length=BUF)
    assert not failed["ok"] and "hung up" in failed["error"]
    assert w.testpmd.proc.wait(10) == -signal.SIGKILL


def test_a_revoke_during_continuous_traffic_never_lets_the_backend_write_revoked_memory(world):
    """A thread in the bridge process sends and receives without pause (each buffer posted
    again when it comes back) over receive buffers alternating below and above 2 MiB, and
    [2 MiB, 4 MiB) is revoked in the middle of it. The buffers above were on the ring: they
    are taken off it (the bridge says which), posting them again is refused, the backend
    writes nothing there after the revoke, and traffic goes on through the rest."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    low = [RX_AT + i * BUF for i in range(8)]
    high = [3 * MiB + i * BUF for i in range(8)]
    for lo, hi in zip(low, high, strict=True):
        w.bridge.ok("post_rx", gpa=lo, length=BUF)
        w.bridge.ok("post_rx", gpa=hi, length=BUF)
    w.testpmd.start()
    w.bridge.ok("traffic", tx=TX_AT, frame=frame(5).hex(), length=BUF)
    time.sleep(0.3)
    report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
    t_revoked = time.monotonic()
    w.mem.write(3 * MiB, b"\xee" * 8 * BUF)
    time.sleep(0.3)
    stats = w.bridge.ok("traffic_stop")
    assert [(c.outcome, c.withdrawn) for c in report.clients] == [("acked", ())]
    assert stats["errors"] == [] and stats["bad"] == 0, stats
    before = [gpa for t, gpa in stats["received_at"] if t < t_revoked]
    after = [gpa for t, gpa in stats["received_at"] if t > t_revoked]
    assert set(high) & set(before), "traffic did not go through the upper buffers first"
    assert after and set(after) <= set(low), after
    (rev,) = w.bridge.ok("revocations")["revocations"]
    taken = {gpa for _, gpa, _ in rev["taken_off"]}
    assert taken and taken <= set(high) and rev["in_backend"] == [], rev
    # Every upper buffer was either taken off the ring or came back and was refused.
    assert taken | set(stats["refused"]) == set(high), (taken, stats["refused"])
    assert all(gpa < 2 * MiB for gpa, _ in w.bridge.ok("in_flight")["rx"])
    assert w.mem.read(3 * MiB, 8 * BUF) == b"\xee" * 8 * BUF


# -- what a revoke checks, and where -----------------------------------------------------------


class SecondMapping:
    """A second vhost-user connection to the same testpmd, made by the test: a table with one
    region of the space at file offset `offset` makes testpmd map the space (from file offset
    0, as DPDK does) at an address of its choosing, which the bridge never asked for. It goes
    when the connection is closed."""

    def __init__(self, w: World, offset: int, size: int) -> None:
        self.w = w
        before = set(w.testpmd_maps_at())
        self.frontend = vu.Frontend(str(w.testpmd.sock))
        try:
            self.frontend.negotiate(vu.VIRTIO_F_VERSION_1, vu.PROTOCOL_F_REPLY_ACK)
            region = vu.MemRegion(0, size, 0x7F0000000000, offset)
            self.frontend.set_mem_table([region], w.space.fd)
        except BaseException:
            self.frontend.close()
            raise
        (self.vma,) = set(w.testpmd_maps_at()) - before

    def close(self) -> None:
        self.frontend.close()
        deadline = time.monotonic() + 5
        while self.vma in self.w.testpmd_maps_at():
            assert time.monotonic() < deadline, "testpmd kept the second mapping"
            time.sleep(0.01)


def test_a_revoke_reads_the_backends_whole_maps_once(world):
    """Releasing the pin asks the kernel only where the backend mapped the space (the last
    full read, no message since); the acknowledgement reads the backend's whole maps, after
    the revocation arrived. One full read per revoke, and still nothing of the range mapped."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    w.testpmd.start()
    assert len(round_trip(w, [frame(0)])) == 1
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    for _ in range(3):
        reads = w.bridge.ok("full_reads")["full_reads"]
        report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
        assert [(c.outcome, c.withdrawn) for c in report.clients] == [("acked", ())]
        assert w.bridge.ok("full_reads")["full_reads"] == reads + 1
        assert w.testpmd_maps() == [(0, 2 * MiB)]
        got = round_trip(w, [frame(1)])
        assert got == [(RX_AT, RX_HEADER + frame(1))]
        w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
        seq = w.space.grant("bridge", 2 * MiB, 2 * MiB)
        assert w.bridge.ok("refresh", seq=seq)["left_out"] == []
    assert w.owner.stats().fenced_total == 0


def test_the_revoked_range_mapped_at_a_second_address_is_never_acked(world):
    """testpmd maps the space a second time (another connection's table) after the bridge's
    last full read of its maps: the pin's release looks only where the bridge's own regions
    were mapped and lets the pin go, but the acknowledgement reads the whole maps, finds the
    second mapping and refuses: the broker fences the bridge, never "acked"."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    second = SecondMapping(w, 3 * MiB, MiB)
    try:
        assert sorted(w.testpmd_maps()) == [(0, 4 * MiB), (0, 4 * MiB)]
        report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
        ((c,),) = [report.clients]
        assert c.outcome == "fenced", c
        assert "refused to tear down" in c.reason
        assert "the backend still maps offsets 0x200000+0x200000" in c.reason
        assert f"start={second.vma[0]}" in c.reason
        assert w.bridge.wait(10) == -signal.SIGKILL
    finally:
        second.close()


def test_a_known_second_mapping_keeps_the_pin_and_on_pinned_fail_changes_nothing(world):
    """The second mapping exists before the bridge starts, so its full read at start saw it:
    the pin's release checks every mapping of the range that read showed, finds the second
    one still there and keeps the pin; on_pinned="fail" leaves everything as it was. Once
    the second connection is gone, the same revoke is acknowledged."""
    from membroker.errors import FailedPrecondition

    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    second = SecondMapping(w, 3 * MiB, MiB)
    try:
        w.start()
        assert sorted(w.testpmd_maps()) == [(0, 4 * MiB), (0, 4 * MiB)]
        with pytest.raises(FailedPrecondition) as failed:
            w.space.revoke("bridge", 2 * MiB, 2 * MiB, on_pinned="fail")
        assert "pinned by client 'bridge'" in str(failed.value)
        assert "nothing changed" in str(failed.value)
        assert [c for c, _ in w.space.grants()] == ["bridge"]
    finally:
        second.close()
    report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert w.testpmd_maps() == [(0, 2 * MiB)]
    assert w.owner.stats().fenced_total == 0


# -- what the owner's report says ----------------------------------------------------------------


def space_fds(pid: int, space_fd: int) -> list[int]:
    """The fds through which process `pid` holds the space's file (its /proc/PID/fd)."""
    st = os.fstat(space_fd)
    view = ProcessView(pid)
    try:
        return view.fds_of(st.st_dev, st.st_ino)
    finally:
        view.close()


def test_the_owners_report_lists_the_buffers_that_were_in_flight(world):
    """Receive buffers above 2 MiB (not adjacent: one range each) are on the ring when
    [2 MiB, 4 MiB) is revoked under traffic: the owner's report (the revoke call's, the
    listing's and membrokerctl's) lists exactly their bytes as in flight, nothing withdrawn."""
    from membroker.ctl import _report

    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    w.bridge.ok("net_queues", gpa=0)
    low = [RX_AT + i * BUF for i in range(4)]
    high = [3 * MiB + 2 * i * BUF for i in range(3)]
    for gpa in low[:2] + high + low[2:]:
        w.bridge.ok("post_rx", gpa=gpa, length=BUF)
    w.testpmd.start()
    assert [gpa for gpa, _ in round_trip(w, [frame(0), frame(1)])] == low[:2]
    report = w.space.revoke("bridge", 2 * MiB, 2 * MiB)
    (outcome,) = report.clients
    assert outcome.outcome == "acked" and outcome.withdrawn == ()
    # The space has no layout: guest-physical address = offset.
    assert outcome.in_flight == tuple((gpa, BUF) for gpa in high), report
    (listed,) = [r for r in w.space.revocations() if r.seq == report.seq]
    assert listed.clients[0].in_flight == outcome.in_flight
    (rev,) = w.bridge.ok("revocations")["revocations"]
    assert rev["lost"] == [[gpa, gpa + BUF] for gpa in high]
    text = _report(report)
    assert "IN_FLIGHT" in text and "0x300000+0x800,0x301000+0x800,0x302000+0x800" in text
    # Traffic goes on into what is still granted; a later revoke with nothing in flight in
    # its range says so.
    assert round_trip(w, [frame(2)]) == [(low[2], RX_HEADER + frame(2))]
    report = w.space.revoke("bridge", MiB + 512 * 1024, 512 * 1024)
    assert [(c.outcome, c.in_flight) for c in report.clients] == [("acked", ())]


def test_testpmd_keeps_fds_of_the_space_so_its_isolation_is_labelled_logical_only(world):
    """DPDK keeps one fd per region of the loaded table (it could map any offset of the
    space through them): the bridge sees it in testpmd's /proc/PID/fd and says so; the
    listing and the owner's report show the label, with the count the kernel shows. Once
    nothing of the space is exported, testpmd holds no fd of it and the label goes."""
    from membroker.ctl import _report, build_parser, run

    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    held = space_fds(w.testpmd.pid, w.space.fd)
    assert held, "testpmd was expected to keep its region fds"
    found = w.bridge.ok("isolation")
    assert found["backend_keeps_fds"] is True
    expect = f"the backend (pid {w.testpmd.pid}) holds {len(held)} fd(s) of the whole space"
    assert found["isolation"].startswith(expect), found

    def listed() -> dict[str, str]:
        (bridge,) = [s for s in w.owner.list_sessions() if s.client == "bridge"]
        return dict(bridge.isolation)

    assert listed() == {w.space.space_id: found["isolation"]}
    text, _ = run(build_parser().parse_args(["sessions"]), w.owner)
    assert f"{w.space.space_id}(logical-only)" in text and expect in text, text
    # A revocation's report carries it (two regions are left: still logical only).
    report = w.space.revoke("bridge", 3 * MiB, MiB)
    (outcome,) = report.clients
    assert outcome.outcome == "acked"
    assert outcome.isolation.startswith(f"the backend (pid {w.testpmd.pid}) holds"), outcome
    assert "isolation is logical only" in _report(report)
    # Everything revoked: the table holds only the bridge's parking page.
    report = w.space.revoke("bridge", 0, 3 * MiB)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert space_fds(w.testpmd.pid, w.space.fd) == []
    assert report.clients[0].isolation == ""
    assert listed() == {}


# -- IOTLB permissions follow the grant --------------------------------------------------------


def tx_buffer(w: World, gpa: int, f: bytes) -> int:
    """Writes a transmit buffer (zero header, frame) as the owner; returns its length."""
    w.mem.write(gpa, bytes(vn.HDR_LEN) + f)
    return vn.HDR_LEN + len(f)


def misses(log: list, lo: int, hi: int) -> list[tuple[int, str]]:
    return [
        (iova, outcome) for _, what, iova, _, outcome in log if what == "miss" and lo <= iova < hi
    ]


def assert_device_cannot_write(w: World, gpa: int, f: bytes) -> None:
    """A receive buffer at `gpa` (read-only memory, in [2 MiB, 4 MiB)) put on the ring anyway:
    testpmd's write miss there is refused, the frame `f` is not delivered, the memory stays."""
    w.mem.write(gpa, b"\xee" * BUF)
    seen = len(w.bridge.ok("iotlb_log")["log"])
    w.bridge.ok("post_rx_raw", gpa=gpa, length=BUF)
    w.bridge.ok("send", gpa=TX_AT, frame=f.hex())
    assert w.bridge.ok("receive", count=1, wait=1.0)["packets"] == []
    after = w.bridge.ok("iotlb_log")["log"][seen:]
    asked = misses(after, 2 * MiB, 4 * MiB)
    assert asked and all(o == "refused: perm 3 of read-only memory" for _, o in asked), after
    assert w.mem.read(gpa, BUF) == b"\xee" * BUF
    assert w.owner.stats().fenced_total == 0


def test_a_read_only_grant_gives_read_only_iotlb_entries(iommu_world):
    """[2 MiB, 4 MiB) is granted read-only. testpmd reads a frame the owner wrote there
    (its miss is served with a read-only entry) and sends it back into read-write memory;
    a receive buffer there is refused by the bridge, and one put on the ring anyway makes
    testpmd ask to write: refused, nothing delivered, the memory untouched."""
    w = iommu_world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 2 * MiB)
    w.space.grant("bridge", 2 * MiB, 2 * MiB, "ro")
    w.start(iommu=True)
    assert w.bridge.ok("exported")["regions"] == [[0, 4 * MiB, 0]]
    w.bridge.ok("net_queues", gpa=0)
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    w.testpmd.start()
    ro_tx, ro_rx = 3 * MiB, 3 * MiB + 64 * 1024
    w.bridge.ok("post_tx", gpa=ro_tx, length=tx_buffer(w, ro_tx, frame(3)))
    got = w.bridge.ok("receive", count=1, wait=5)["packets"]
    assert [(gpa, bytes.fromhex(d)) for gpa, d in got] == [(RX_AT, RX_HEADER + frame(3))]
    log = w.bridge.ok("iotlb_log")["log"]
    served = misses(log, 2 * MiB, 4 * MiB)
    assert served and all(o.endswith(" as ro") for _, o in served), served
    assert all(o.startswith("served 0x200000+0x200000 perm 1") for _, o in served), served
    refused = w.bridge.cmd("post_rx", gpa=ro_rx, length=BUF)
    assert not refused["ok"] and "held read-only" in refused["error"], refused
    assert_device_cannot_write(w, ro_rx, frame(4))


def test_a_downgrade_invalidates_then_gives_read_only_entries(iommu_world):
    """testpmd writes a packet into [2 MiB, 4 MiB) through a read-write entry; the owner then
    lowers the range to read-only. The backend acknowledges an INVALIDATE of it before the
    broker is acknowledged, the range is not withdrawn: testpmd still reads a frame there
    (a read-only entry), and can no longer write there (its write miss is refused, the
    packet not delivered, the memory untouched)."""
    w = iommu_world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start(iommu=True)
    w.bridge.ok("net_queues", gpa=0)
    high = 3 * MiB
    w.bridge.ok("post_rx", gpa=high, length=BUF)
    w.testpmd.start()
    assert round_trip(w, [frame(0)]) == [(high, RX_HEADER + frame(0))]
    before = w.bridge.ok("iotlb_log")["log"]
    # One read-write entry for the whole export.
    rw = misses(before, 0, 4 * MiB)
    assert rw and all(o.startswith("served 0x0+0x400000 perm") for _, o in rw), rw
    assert all(o.endswith(" as rw") for _, o in rw), rw
    w.space.grant("bridge", 2 * MiB, 2 * MiB, "ro")
    t_lowered = time.monotonic()
    (report,) = [r for r in w.space.revocations() if r.cause == "downgrade"]
    assert [(c.outcome, c.withdrawn) for c in report.clients] == [("acked", ())], report
    log = w.bridge.ok("iotlb_log")["log"]
    inval = [
        (t, iova, size) for t, what, iova, size, _ in log[len(before) :] if what == "invalidate"
    ]
    assert (2 * MiB, 2 * MiB) in [(i, n) for _, i, n in inval] and inval[0][0] < t_lowered
    assert w.bridge.ok("exported")["regions"] == [[0, 2 * MiB, 0], [2 * MiB, 2 * MiB, 2 * MiB]]
    # Reading goes on.
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    w.bridge.ok("post_tx", gpa=high + BUF, length=tx_buffer(w, high + BUF, frame(5)))
    got = w.bridge.ok("receive", count=1, wait=5)["packets"]
    assert [(gpa, bytes.fromhex(d)) for gpa, d in got] == [(RX_AT, RX_HEADER + frame(5))]
    # Writing does not.
    assert_device_cannot_write(w, high, frame(6))


def test_a_raise_to_read_write_gives_read_write_entries_at_the_next_refresh(iommu_world):
    """[2 MiB, 4 MiB) is granted read-only, then raised to read-write. At the next refresh
    the bridge invalidates its read-only entries and exports it again: a receive buffer
    there, refused while it was read-only, now takes a packet testpmd writes through a
    read-write entry."""
    w = iommu_world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 2 * MiB)
    w.space.grant("bridge", 2 * MiB, 2 * MiB, "ro")
    w.start(iommu=True)
    w.bridge.ok("net_queues", gpa=0)
    high = 3 * MiB
    refused = w.bridge.cmd("post_rx", gpa=high, length=BUF)
    assert not refused["ok"] and "held read-only" in refused["error"], refused
    w.testpmd.start()
    seq = w.space.grant("bridge", 2 * MiB, 2 * MiB, "rw")
    seen = len(w.bridge.ok("iotlb_log")["log"])
    assert w.bridge.ok("refresh", seq=seq)["left_out"] == []
    log = w.bridge.ok("iotlb_log")["log"][seen:]
    assert (2 * MiB, 2 * MiB) in [(iova, n) for _, what, iova, n, _ in log if what == "invalidate"]
    w.bridge.ok("post_rx", gpa=high, length=BUF)
    # The first frame meets a cold IOTLB there: DPDK asks (a miss) and drops that packet.
    for _ in range(5):
        w.bridge.ok("send", gpa=TX_AT, frame=frame(7).hex())
        got = w.bridge.ok("receive", count=1, wait=1.0)["packets"]
        if got:
            break
    after = w.bridge.ok("iotlb_log")["log"][seen:]
    assert [(gpa, bytes.fromhex(d)) for gpa, d in got] == [(high, RX_HEADER + frame(7))], after
    served = misses(after, 2 * MiB, 4 * MiB)
    assert served and all(o.endswith(" as rw") for _, o in served), after
    assert w.owner.stats().fenced_total == 0


def test_the_isolation_label_is_told_again_after_a_live_upgrade(daemon, world):
    """The broker does not keep the label across a restart: a daemon upgraded in place meets
    the bridge's resumed session without it, and the bridge, re-bound, tells it again."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 4 * MiB)
    w.start()
    note = w.bridge.ok("isolation")["isolation"]
    assert note.startswith(f"the backend (pid {w.testpmd.pid}) holds"), note

    def listed() -> dict[str, str] | None:
        try:
            sessions = w.owner.list_sessions()
        except membroker.BrokerRestarting:
            return None
        bridge = [s for s in sessions if s.client == "bridge"]
        return dict(bridge[0].isolation) if bridge else None

    assert listed() == {w.space.space_id: note}
    upgrade = subprocess.run(
        [
            sys.executable,
            "-m",
            "membroker.ctl",
            "--runtime-dir",
            str(daemon.runtime_dir),
            "upgrade",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert wait_until(lambda: listed() == {w.space.space_id: note}, 15), listed()
    # The net path still works through the re-bound bridge.
    w.bridge.ok("net_queues", gpa=0)
    w.bridge.ok("post_rx", gpa=RX_AT, length=BUF)
    w.testpmd.start()
    assert round_trip(w, [frame(9)]) == [(RX_AT, RX_HEADER + frame(9))]


def test_without_an_iotlb_read_only_ranges_are_left_out_and_refresh_says_so(world):
    """A backend maps every region read-write: without an IOTLB to narrow it, a range held
    read-only is not exported, and `refresh()` lists it among what it left out."""
    w = world
    w.space.share(0, 4 * MiB)
    w.space.grant("bridge", 0, 2 * MiB)
    w.space.grant("bridge", 2 * MiB, 2 * MiB, "ro")
    w.start()
    assert w.bridge.ok("exported")["regions"] == [[0, 2 * MiB, 0]]
    assert w.bridge.ok("refresh")["left_out"] == [[2 * MiB, 2 * MiB]]
    assert w.testpmd_maps() == [(0, 2 * MiB)]
