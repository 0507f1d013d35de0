"""The vhost-user frontend bridge against a real qemu-storage-daemon (PEERS.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
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
    owner = membroker.connect("vmm", daemon.runtime_dir)
    space = owner.create_space(4 * MiB)
    mem = space.map()
    bridge = Bridge(daemon.runtime_dir)
    yield qsd, owner, space, mem, bridge
    bridge.close()
    mem.close()
    space.close()
    owner.close()
    qsd.stop()


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
    refused = bridge.cmd("start", space=space.space_id, socket=str(qsd.sock))
    assert not refused["ok"]
    expected = "maps offsets 0x0-0x100000 of the space for a region of 0x100000+0x100000: more"
    assert expected in refused["error"]
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
    assert owner.get_space(space.space_id).attachments == 0
    assert owner.list_pins(space.space_id) == []
    # The grant stays with the name: a new bridge to a new backend gets the memory back.
    assert [c for c, _ in space.grants()] == ["bridge"]


def test_a_frozen_backend_never_yields_a_false_ack(world):
    """A frozen backend never answers REM_MEM_REG and keeps the region mapped. The bridge does
    not acknowledge (it waits for the reply, then for the backend's maps), so the broker fences
    it at the deadline, and the report says what that achieved: the bridge, stuck in its
    teardown with the space's fd, is killed. Never "acked" while the backend maps the range."""
    from tests.conftest import stop_process

    qsd, _, space, _, bridge = world
    space.share(0, 2 * MiB)
    space.grant("bridge", 0, MiB)
    bridge.ok("start", space=space.space_id, socket=str(qsd.sock))
    assert qsd.maps_of(space.fd) == [(0, MiB)]
    stop_process(qsd.proc.pid)
    try:
        report = space.revoke("bridge", 0, MiB)
        ((outcome, reason, fence),) = [(c.outcome, c.reason, c.fence) for c in report.clients]
        assert outcome == "fenced"
        assert reason.startswith("no acknowledgement of seq 3 within 3000 ms")
        assert fence == "killed"
        assert bridge.wait(10) == -signal.SIGKILL
        # The backend itself still maps the space: the bridge cannot unmap another process.
        assert qsd.maps_of(space.fd) == [(0, MiB)]
    finally:
        os.kill(qsd.proc.pid, signal.SIGCONT)
