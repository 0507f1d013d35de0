"""The vhost-user frontend bridge against a real qemu-storage-daemon (PEERS.md)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import membroker
from membroker import vhost_user as vu
from membroker._sys.proc import ProcessView
from tests.conftest import PeerProc

QSD = shutil.which("qemu-storage-daemon")
pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        QSD is None,
        reason="qemu-storage-daemon is not installed "
        "(apt-get install qemu-system-common; make test does)",
    ),
]
BRIDGE = Path(__file__).with_name("bridge_proc.py")
SAMPLER = Path(__file__).with_name("maps_sampler.py")
PAGE = 4096
MiB = 1 << 20


class Qsd:
    def __init__(self, tmp: Path) -> None:
        self.disk = tmp / "disk.img"
        self.disk.write_bytes(bytes(range(256)) * (4 * MiB // 256))
        self.sock = tmp / "vhost-user-blk.sock"
        assert QSD is not None
        self.proc = subprocess.Popen(
            [
                QSD,
                "--blockdev",
                f"driver=file,node-name=file0,filename={self.disk}",
                "--export",
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                f"addr.path={self.sock},writable=on",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
            time.sleep(0.005)

    def maps_of(self, space_fd: int) -> list[tuple[int, int]]:
        st = os.fstat(space_fd)
        view = ProcessView(self.proc.pid)
        try:
            return [(v.offset, v.file_end) for v in view.mappings_of(st.st_dev, st.st_ino)]
        finally:
            view.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


def Bridge(runtime_dir: Path) -> PeerProc:
    return PeerProc(BRIDGE, runtime_dir, "bridge")


@pytest.fixture
def world(daemon, tmp_path):
    qsd = Qsd(tmp_path)
    with contextlib.ExitStack() as stack:
        # Whatever fails to start, what did start is ended (qemu-storage-daemon by its pid).
        stack.callback(qsd.stop)
        owner = membroker.connect("vmm", daemon.runtime_dir)
        stack.callback(owner.close)
        space = owner.create_space(4 * MiB)
        stack.callback(space.close)
        mem = space.map()
        stack.callback(mem.close)
        bridge = Bridge(daemon.runtime_dir)
        stack.callback(bridge.close)
        yield qsd, owner, space, mem, bridge


def test_handshake_and_a_grant_maps_memory_in_the_backend(world):
    qsd, _, space, _, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    started = bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    assert started["backend_pid"] == qsd.proc.pid
    assert started["features"] & vu.VIRTIO_F_VERSION_1
    assert started["features"] & vu.F_PROTOCOL_FEATURES
    assert started["protocol_features"] == (
        vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS
    )
    assert bridge.ok("exported")["regions"] == [[0, MiB, 0]]
    # The kernel, not the backend's reply, says what it maps: exactly the granted MiB.
    assert qsd.maps_of(space.fd) == [(0, MiB)]


@pytest.mark.parametrize("mem_slots", [True, False], ids=["ADD_MEM_REG", "SET_MEM_TABLE"])
def test_blk_writes_then_reads_through_broker_memory(world, mem_slots):
    qsd, _, space, mem, bridge = world
    space.share(0, MiB)
    space.grant("bridge", 0, MiB)
    started = bridge.ok("start", space=space.space_id, socket=str(qsd.sock), mem_slots=mem_slots)
    assert started["mem_slots"] is mem_slots
    bridge.ok("queue", gpa=0)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(3 * vu.SECTOR))
    mem.write(0x20000, payload)
    assert (
        bridge.ok(
            "request", kind=vu.VIRTIO_BLK_T_OUT, sector=100, gpa=0x20000, length=len(payload)
        )["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_FLUSH, sector=0, gpa=0, length=0)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    # On the disk image, written by the backend straight from guest memory ...
    with open(qsd.disk, "rb") as f:
        f.seek(100 * vu.SECTOR)
        assert f.read(len(payload)) == payload
    # ... and read back into another place in guest memory, with no copy through the bridge.
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=100, gpa=0x40000, length=len(payload))[
            "status"
        ]
        == vu.VIRTIO_BLK_S_OK
    )
    assert mem.read(0x40000, len(payload)) == payload
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x50000, length=PAGE)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    assert mem.read(0x50000, 8) == bytes(range(8))


def test_revocation_removes_the_region_before_revoke_returns(world):
    qsd, owner, space, mem, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    bridge.ok("queue", gpa=0)
    mem.write(MiB - PAGE, b"outside")
    report = space.revoke("bridge", 0, MiB)
    assert [c.outcome for c in report.clients] == ["acked"]
    # By the time Revoke returned, the backend's own maps show nothing of the space.
    assert qsd.maps_of(space.fd) == []
    assert bridge.ok("exported")["regions"] == []
    # A request pointing into revoked memory is refused by the bridge with a virtio error ...
    refused = bridge.cmd("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x20000, length=PAGE)
    assert not refused["ok"] and "start_queue() first" in refused["error"]
    # ... and guest memory is untouched.
    assert mem.read(MiB - PAGE, 7) == b"outside"
    assert owner.stats().fenced_total == 0


@pytest.mark.parametrize("mem_slots", [True, False], ids=["REM_MEM_REG", "SET_MEM_TABLE"])
def test_partial_revocation_keeps_the_rest_and_refuses_requests_into_the_hole(world, mem_slots):
    qsd, _, space, mem, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock), mem_slots=mem_slots)
    mem.write(0xC0000, b"keep me")
    report = space.revoke("bridge", MiB // 2, MiB // 2)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert bridge.ok("exported")["regions"] == [[0, MiB // 2, 0]]
    assert qsd.maps_of(space.fd) == [(0, MiB // 2)]
    bridge.ok("queue", gpa=0)
    status = bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0xC0000, length=PAGE)
    assert status["status"] == vu.VIRTIO_BLK_S_IOERR
    assert mem.read(0xC0000, 7) == b"keep me"
    ok = bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)
    assert ok["status"] == vu.VIRTIO_BLK_S_OK and mem.read(0x30000, 4) == bytes(range(4))


def test_a_backend_that_would_map_more_than_granted_is_refused(world):
    """qemu-storage-daemon 7.2 (libvhost-user before QEMU 9) maps a region from file offset 0:
    a grant at 1 MiB would expose [0, 1 MiB) too. The bridge checks the kernel and refuses."""
    qsd, owner, space, _, bridge = world
    space.share(0, 4 * MiB)
    space.grant("bridge", MiB, MiB)
    sampler = MapsSampler(qsd.proc.pid, space.fd)
    with sampler:
        refused = bridge.cmd("start", space=space.space_id, socket=str(qsd.sock))
    assert not refused["ok"]
    expected = "maps offsets 0x0+0x100000 of the space for a region of 0x100000+0x100000: more"
    assert expected in refused["error"]
    # Known before anything of the space was exported (a private page was probed): the
    # backend never mapped a byte of it, not even for a moment.
    assert sampler.ever_mapped() == []
    assert qsd.maps_of(space.fd) == []
    # A refused bridge leaves nothing behind in the broker either.
    assert owner.get_space(space.space_id).attachments == 0


def test_backend_killed_mid_session_releases_what_the_bridge_held(world):
    qsd, owner, space, _, bridge = world
    space.share(0, MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    assert owner.get_space(space.space_id).attachments == 1
    os.kill(qsd.proc.pid, signal.SIGKILL)
    assert qsd.proc.wait(10) == -signal.SIGKILL
    assert bridge.ok("watch")["gone"] is True
    bridge.ok("close")
    assert owner.get_space(space.space_id).attachments == 0
    assert owner.list_pins(space.space_id) == []
    # The grant stays with the name: a new bridge to a new backend gets the memory back.
    assert [c for c, _ in space.grants()] == ["bridge"]


def test_a_frozen_backend_never_yields_a_false_ack(world):
    """A frozen backend never answers REM_MEM_REG and keeps the region mapped. The bridge
    pins what the backend maps, so the broker asks it to release first; it cannot (it waits
    for the reply, then for the backend's maps), and the broker's on_pinned policy decides:
    "fail" leaves everything as it was, with an error naming the bridge's pin; "fence" kills
    the bridge, stuck in its teardown with the space's fd. Never "acked" while the backend maps
    the range."""
    from membroker.errors import FailedPrecondition
    from tests.conftest import stop_process

    qsd, owner, space, _, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    assert qsd.maps_of(space.fd) == [(0, MiB)]
    assert [
        (p.client, p.range.offset, p.range.length) for p in owner.list_pins(space.space_id)
    ] == [("bridge", 0, MiB)]
    stop_process(qsd.proc.pid)
    try:
        t0 = time.monotonic()
        with pytest.raises(FailedPrecondition) as failed:
            space.revoke("bridge", 0, MiB, on_pinned="fail")
        assert time.monotonic() - t0 < 5
        assert "pinned by client 'bridge'" in str(failed.value)
        assert "nothing changed" in str(failed.value)
        assert [c for c, _ in space.grants()] == ["bridge"]
        report = space.revoke("bridge", 0, MiB, on_pinned="fence")
        ((outcome, reason, fence),) = [(c.outcome, c.reason, c.fence) for c in report.clients]
        assert outcome == "fenced"
        assert "still pinned" in reason
        assert fence == "killed"
        assert bridge.wait(10) == -signal.SIGKILL
        # The backend itself still maps the space: the bridge cannot unmap another process.
        assert qsd.maps_of(space.fd) == [(0, MiB)]
    finally:
        os.kill(qsd.proc.pid, signal.SIGCONT)


class MapsSampler:
    """maps_sampler.py around a block: what the backend's /proc/PID/maps showed of the space,
    read after read, as (monotonic time, file ranges)."""

    def __init__(self, pid: int, space_fd: int) -> None:
        self.pid, self.ino = pid, os.fstat(space_fd).st_ino
        self.samples: list[tuple[float, list[tuple[int, int]]]] = []

    def __enter__(self) -> MapsSampler:
        self.proc = subprocess.Popen(
            [sys.executable, str(SAMPLER), str(self.pid), str(self.ino)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.002)
        out, _ = self.proc.communicate(b"stop\n", timeout=30)
        self.samples = [(t, [tuple(s) for s in spans]) for t, spans in json.loads(out)]

    def ever_mapped(self) -> list[tuple[int, int]]:
        return sorted({s for _, spans in self.samples for s in spans})

    @staticmethod
    def touches(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
        return any(s < hi and lo < e for s, e in spans)


@pytest.mark.parametrize("mem_slots", [True, False], ids=["REM_MEM_REG", "SET_MEM_TABLE"])
def test_a_hole_revoked_in_the_middle_never_reappears_and_the_rest_is_reported(world, mem_slots):
    """qemu-storage-daemon 7.2 maps a region from file offset 0. Revoking [256K, 512K) of an
    exported [0, 1M) leaves [0, 256K) (safe) and [512K, 1M) (its mapping would be [0, 1M): the
    hole). The hole must never be mapped by the backend again, not even for a moment (a
    sampler reads its maps throughout), [512K, 1M) is reported withdrawn rather than silently
    dropped, and the vring in [0, 256K) keeps working."""
    qsd, owner, space, mem, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    started = bridge.ok("start", space=space.space_id, socket=str(qsd.sock), mem_slots=mem_slots)
    assert started["prefix_mapping"] is True
    bridge.ok("queue", gpa=0)
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    hole = (MiB // 4, MiB // 2)
    sampler = MapsSampler(qsd.proc.pid, space.fd)
    with sampler:
        t0 = time.monotonic()
        report = space.revoke("bridge", hole[0], hole[1] - hole[0])
        t1 = time.monotonic()
    ((c,),) = [report.clients]
    assert (c.client, c.outcome) == ("bridge", "acked"), c
    during = [spans for t, spans in sampler.samples if t0 <= t <= t1]
    assert len(during) >= 5, f"only {len(during)} samples during the revoke"
    # Mapped before (the sampler sees what it should), then gone, and never again.
    assert sampler.touches(sampler.samples[0][1], *hole)
    first_clear = next(
        i for i, (_, spans) in enumerate(sampler.samples) if not sampler.touches(spans, *hole)
    )
    again = [
        (t - t0, spans)
        for t, spans in sampler.samples[first_clear:]
        if sampler.touches(spans, *hole)
    ]
    assert again == [], f"the hole was mapped again: {again[:3]}"
    assert qsd.maps_of(space.fd) == [(0, MiB // 4)]
    assert bridge.ok("exported")["regions"] == [[0, MiB // 4, 0]]
    # The backend is still given what it may use, and the pins say so.
    assert [
        (p.client, p.range.offset, p.range.length) for p in owner.list_pins(space.space_id)
    ] == [("bridge", 0, MiB // 4)]
    # The ring survived the change of its region, at the same place.
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x20000, length=PAGE)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    assert mem.read(0x20000, 4) == bytes(range(4))
    # Still granted, but not given to the backend: requests there are refused by the bridge.
    assert [(cl, r.offset, r.length) for cl, r in space.grants()] == [
        ("bridge", 0, MiB // 4),
        ("bridge", MiB // 2, MiB // 2),
    ]
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=MiB // 2 + PAGE, length=PAGE)[
            "status"
        ]
        == vu.VIRTIO_BLK_S_IOERR
    )
    # The owner's report says what was withdrawn (not a log line).
    assert c.withdrawn == ((MiB // 2, MiB // 2),)


def test_revoking_the_rings_memory_stops_the_ring_cleanly_and_the_connection_lives(world):
    """The vring lives in revoked memory: the bridge stops it (parked on its own page) before
    the region goes, so the backend neither panics nor drops the connection; the revoke is
    acked promptly, requests fail at once with a reason naming the ring, and a new grant
    brings a new queue up on the same connection."""
    qsd, owner, space, mem, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    bridge.ok("queue", gpa=0)
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    t0 = time.monotonic()
    report = space.revoke("bridge", 0, MiB)
    assert time.monotonic() - t0 < 1.0
    assert [(c.outcome, c.withdrawn) for c in report.clients] == [("acked", ())]
    assert qsd.maps_of(space.fd) == []
    t0 = time.monotonic()
    failed = bridge.cmd("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)
    assert time.monotonic() - t0 < 1.0
    assert not failed["ok"]
    assert "vring 0 (gpa 0x0+" in failed["error"] and "was stopped" in failed["error"]
    state = bridge.ok("queue_state")
    assert state["running"] is False
    assert qsd.proc.poll() is None
    # Same connection, new memory, new queue.
    seq = space.grant("bridge", 0, MiB)
    assert bridge.ok("refresh", seq=seq)["left_out"] == []
    assert qsd.maps_of(space.fd) == [(0, MiB)]
    bridge.ok("queue", gpa=0x80000)
    assert (
        bridge.ok("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)["status"]
        == vu.VIRTIO_BLK_S_OK
    )
    assert mem.read(0x30000, 4) == bytes(range(4))
    assert owner.stats().fenced_total == 0


def test_a_backend_that_drops_the_connection_during_a_revoke_is_not_acked(world):
    """libvhost-user panics (and drops the connection) on a REM_MEM_REG it cannot match; the
    bridge then refuses the revocation with the reason: never "acked". The broker fences it
    per its policy and says so in the report."""
    qsd, _, space, _, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    bridge.ok("sabotage")
    report = space.revoke("bridge", 0, MiB)
    ((c,),) = [report.clients]
    assert c.outcome == "fenced", c
    assert "refused to tear down" in c.reason
    assert "dropped the connection" in c.reason


def test_a_killed_backend_is_noticed_at_once_and_everything_released(world):
    qsd, owner, space, _, bridge = world
    space.share(0, MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    bridge.ok("queue", gpa=0)
    assert len(owner.list_pins(space.space_id)) == 1
    t_kill = time.monotonic()
    os.kill(qsd.proc.pid, signal.SIGKILL)
    watched = bridge.ok("watch", timeout=5)
    assert watched["gone"] is True
    assert "hung up" in watched["reason"]
    noticed = watched["gone_at"] - t_kill
    assert noticed < 0.1, f"noticed after {noticed * 1000:.1f} ms"
    print(f"backend hang-up noticed {noticed * 1e3:.2f} ms after SIGKILL")
    # Released by the bridge itself, at once: no pins left for a revoke to wait on.
    assert owner.list_pins(space.space_id) == []
    failed = bridge.cmd("request", kind=vu.VIRTIO_BLK_T_IN, sector=0, gpa=0x30000, length=PAGE)
    assert not failed["ok"] and "hung up" in failed["error"]
    # A revoke now is acknowledged at once (nothing is mapped by anyone), not a hang.
    t0 = time.monotonic()
    report = space.revoke("bridge", 0, MiB)
    assert time.monotonic() - t0 < 1.0
    assert [c.outcome for c in report.clients] == ["acked"]
    bridge.ok("close")
    assert owner.get_space(space.space_id).attachments == 0
    qsd.proc.wait(10)


def test_closing_the_bridge_leaves_nothing_mapped_in_the_backend(world):
    qsd, owner, space, _, bridge = world
    space.share(0, MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    bridge.ok("queue", gpa=0)
    assert qsd.maps_of(space.fd) == [(0, MiB)]
    bridge.ok("close")
    # Detached only once the backend's own maps show nothing of the space.
    assert qsd.maps_of(space.fd) == []
    assert owner.get_space(space.space_id).attachments == 0
    assert owner.list_pins(space.space_id) == []


def test_qemu_storage_daemon_keeps_no_fd_of_the_space_so_no_isolation_label(world):
    """qemu-storage-daemon closes each region's fd once it has mapped it (its /proc/PID/fd
    shows none of the space): the bridge finds that at the probe, says nothing, and neither
    the listing nor a revocation's report labels its isolation logical only."""
    qsd, owner, space, _, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, 2 * MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    assert qsd.maps_of(space.fd) == [(0, 2 * MiB)]
    st = os.fstat(space.fd)
    view = ProcessView(qsd.proc.pid)
    try:
        assert view.fds_of(st.st_dev, st.st_ino) == []
    finally:
        view.close()
    assert bridge.ok("isolation") == {"ok": True, "backend_keeps_fds": False, "isolation": ""}
    (listed,) = [s for s in owner.list_sessions() if s.client == "bridge"]
    assert space.space_id in listed.attached_spaces and dict(listed.isolation) == {}
    report = space.revoke("bridge", MiB, MiB)
    assert [(c.outcome, c.isolation) for c in report.clients] == [("acked", "")]
