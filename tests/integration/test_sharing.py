"""End to end: an owner shares memory with real client processes and takes it back."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

import membroker
from membroker._sys.kvm import guest_memfd_support
from membroker._sys.proc import fd_targets

PAGE = 4096
MiB = 1 << 20

GMEM_OK, GMEM_WHY = guest_memfd_support()
BACKINGS = [
    "memfd",
    pytest.param("guest_memfd", marks=pytest.mark.skipif(not GMEM_OK, reason=GMEM_WHY)),
]


@pytest.fixture
def owner(daemon):
    with membroker.connect("vmm", daemon.runtime_dir) as session:
        yield session


def _dead_signal(client) -> int:
    rc = client.wait(20)
    assert rc < 0, f"client exited with {rc}, not a signal"
    return -rc


@pytest.mark.parametrize("backing", BACKINGS)
def test_client_reads_owner_pattern_and_owner_sees_client_write(owner, clients, backing):
    space = owner.create_space(4 * MiB, backing=backing, name="guest0")
    mem = space.map()
    pattern = bytes(range(256)) * 16
    mem.write(MiB, pattern)
    space.share(0, 2 * MiB)
    space.grant("backend", MiB, MiB, "rw")

    backend = clients("backend")
    attached = backend.ok("attach_va", space=space.space_id)
    assert attached["ranges"] == [[MiB, MiB, "RW"]]
    assert (
        bytes.fromhex(backend.ok("read", space=space.space_id, offset=MiB, length=PAGE)["data"])
        == pattern
    )
    backend.ok("write", space=space.space_id, offset=MiB + 8, data="deadbeef")
    # Same pages, no copy: the owner's own mapping sees the client's store at once.
    assert mem.read(MiB + 8, 4) == bytes.fromhex("deadbeef")
    assert mem.read(MiB, 8) == pattern[:8]
    mem.close()


@pytest.mark.parametrize("backing", BACKINGS)
def test_revoked_page_kills_client_while_granted_page_stays_readable(owner, clients, backing):
    space = owner.create_space(2 * MiB, backing=backing)
    mem = space.map()
    mem.write(0, b"A" * PAGE + b"B" * PAGE)
    space.share(0, 2 * MiB)
    space.grant("backend", 0, 2 * PAGE, "rw")
    backend = clients("backend")
    backend.ok("attach_va", space=space.space_id)
    assert backend.ok("touch", space=space.space_id, offset=PAGE)["value"] == ord("B")

    report = space.revoke("backend", PAGE, PAGE)
    assert [(c.client, c.outcome, c.pid) for c in report.clients] == [
        ("backend", "acked", backend.pid)
    ]
    assert report.revoked_bytes == PAGE
    # The page that is still granted stays readable in that same process ...
    assert backend.ok("touch", space=space.space_id, offset=0)["value"] == ord("A")
    ranges = backend.ok("ranges", space=space.space_id)
    assert ranges["ranges"] == [[0, PAGE, "RW"]] and ranges["revokes"] == [1]
    # ... and the revoked one is a fault: the process dies rather than touch guest memory.
    result = backend.cmd("touch", space=space.space_id, offset=PAGE)
    assert result.get("dead"), result
    assert _dead_signal(backend) in (signal.SIGSEGV, signal.SIGBUS)
    assert mem.read(PAGE, 4) == b"BBBB"
    mem.close()


@pytest.mark.parametrize("backing", BACKINGS)
def test_conversion_to_private_revokes_and_private_ranges_cannot_be_granted(
    owner, clients, backing
):
    space = owner.create_space(2 * MiB, backing=backing)
    space.share(0, 4 * PAGE)
    space.grant("backend", 0, 4 * PAGE, "ro")
    backend = clients("backend")
    assert backend.ok("attach_va", space=space.space_id)["ranges"] == [[0, 4 * PAGE, "RO"]]
    backend.ok("touch", space=space.space_id, offset=3 * PAGE)

    report = space.unshare(2 * PAGE, 2 * PAGE)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert backend.ok("ranges", space=space.space_id)["ranges"] == [[0, 2 * PAGE, "RO"]]
    # The grant record stays (effective access = grants ∩ shared) ...
    assert [(c, r.offset, r.length) for c, r in space.grants()] == [("backend", 0, 4 * PAGE)]
    # ... but a private range cannot be granted, and the refusal names the offset.
    with pytest.raises(membroker.FailedPrecondition, match="offset 0x2000 is private"):
        space.grant("other", 0, 8 * PAGE)
    assert [c for c, _ in space.grants()] == ["backend"]

    result = backend.cmd("touch", space=space.space_id, offset=3 * PAGE)
    assert result.get("dead"), result
    assert _dead_signal(backend) in (signal.SIGSEGV, signal.SIGBUS)


def test_va_client_writes_fail_in_sdk_on_ro_grant_and_crash_when_forced(owner, clients):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("backend", 0, PAGE, "ro")
    backend = clients("backend")
    backend.ok("attach_va", space=space.space_id)
    refused = backend.cmd("write", space=space.space_id, offset=0, data="00")
    assert not refused["ok"] and refused["error"].startswith("NotHeld")
    result = backend.cmd("poke", space=space.space_id, offset=0, value=1)
    assert result.get("dead"), result
    assert _dead_signal(backend) in (signal.SIGSEGV, signal.SIGBUS)


@pytest.mark.parametrize("mode", ["cooperative", "sealed"])
def test_grant_reaches_attached_client_without_reattach(owner, clients, mode):
    """Cooperative: its first rw grant upgrades the read-only description it attached with (the
    mapping is replaced in place). Sealed: the mapping's writability is fixed at attach, so a
    client that will write needs a rw grant before it attaches; here it has one on page 9."""
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("backend", 8 * PAGE, PAGE, "ro")
    if mode == "sealed":
        space.grant("backend", 9 * PAGE, PAGE, "rw")
    backend = clients("backend")
    attached = backend.ok("attach_va", space=space.space_id, mode=mode)
    assert attached["mode"] == mode
    assert attached["ranges"][0] == [8 * PAGE, PAGE, "RO"]
    seq = space.grant("backend", 0, 2 * PAGE, "rw")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(backend.ok("ranges", space=space.space_id)["ranges"]) == 2:
            break
        time.sleep(0.01)
    assert backend.ok("ranges", space=space.space_id)["ranges"][:2] == [
        [0, 2 * PAGE, "RW"],
        [8 * PAGE, PAGE, "RO"],
    ]
    assert owner.get_space(space.space_id).seq == seq
    backend.ok("write", space=space.space_id, offset=PAGE, data="5a")
    with space.map() as mem:
        assert mem.read(PAGE, 1) == b"\x5a"


def test_attach_without_a_grant_is_refused_and_hands_out_no_fd(daemon, owner, clients):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    nosy = clients("nosy")
    nosy.ok("ranges_of_nothing")
    fds_before = daemon.open_fds()  # after the client's first control call opened its channel
    for op in ("attach_va", "attach_fd", "attach_va"):
        result = nosy.cmd(op, space=space.space_id)
        assert not result["ok"]
        assert "FailedPrecondition" in result["error"]
        assert "holds no grant on" in result["error"]
    # No fd of the space reached the client, and the broker holds nothing more.
    assert not any("membroker:" in t for t in fd_targets(nosy.pid))
    assert daemon.open_fds() == fds_before
    assert owner.get_space(space.space_id).attachments == 0


def test_broker_memfd_is_sealed_against_client_truncate(owner, clients):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("dma", 0, MiB)
    dma = clients("dma")
    dma.ok("attach_fd", space=space.space_id)
    for size in (0, PAGE, 2 * MiB):
        result = dma.cmd("truncate", space=space.space_id, size=size)
        assert not result["ok"] and result["errno"] == errno.EPERM, result
    assert os.fstat(space.fd).st_size == MiB


@pytest.mark.skipif(not GMEM_OK, reason=GMEM_WHY)
def test_guest_memfd_space_has_no_read_syscall(owner, clients):
    space = owner.create_space(MiB, backing="guest_memfd")
    space.share(0, MiB)
    space.grant("dma", 0, MiB)
    dma = clients("dma")
    dma.ok("attach_fd", space=space.space_id)
    result = dma.cmd("pread", space=space.space_id, offset=0, length=16)
    assert not result["ok"] and result["errno"] in (errno.ESPIPE, errno.EINVAL), result
    with pytest.raises(OSError):
        os.pread(space.fd, 16, 0)


def test_fd_client_pins_and_on_revoke_runs_before_the_ack(owner, clients):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("dma", 0, 4 * PAGE)
    dma = clients("dma")
    dma.ok("attach_fd", space=space.space_id)
    pin_id = dma.ok("pin", space=space.space_id, offset=0, length=2 * PAGE)["pin_id"]
    pins = owner.list_pins(space.space_id)
    assert [(p.pin_id, p.client, p.pid, p.range.offset, p.range.length) for p in pins] == [
        (pin_id, "dma", dma.pid, 0, 2 * PAGE)
    ]
    refused = dma.cmd("pin", space=space.space_id, offset=4 * PAGE, length=PAGE)
    assert not refused["ok"] and "FailedPrecondition" in refused["error"]
    dma.ok("unpin", pin_id=pin_id)
    assert owner.list_pins(space.space_id) == []

    report = space.revoke("dma", 0, 4 * PAGE)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert dma.ok("ranges", space=space.space_id) == {"ok": True, "ranges": [], "revokes": [1]}


def test_sigkilled_client_releases_everything_but_keeps_its_grants(owner, clients, daemon):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("backend", 0, 2 * PAGE)
    space.grant("dma", 2 * PAGE, 2 * PAGE)
    owner.ping()
    baseline = daemon.open_fds()

    backend = clients("backend")
    backend.ok("attach_va", space=space.space_id)
    dma = clients("dma")
    dma.ok("attach_fd", space=space.space_id)
    dma.ok("pin", space=space.space_id, offset=2 * PAGE, length=PAGE)
    assert len(owner.list_pins(space.space_id)) == 1
    assert daemon.open_fds() > baseline

    for proc in (backend, dma):
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        owner.get_space(space.space_id).attachments or daemon.open_fds() != baseline
    ):
        time.sleep(0.02)
    assert owner.get_space(space.space_id).attachments == 0
    assert owner.list_pins(space.space_id) == []
    assert daemon.open_fds() == baseline
    assert sorted(c for c, _ in space.grants()) == ["backend", "dma"]
    assert [s.client for s in owner.list_sessions()] == ["vmm"]

    # Grants belong to the name: a restarted backend gets its access back.
    again = clients("backend")
    assert again.ok("attach_va", space=space.space_id)["ranges"] == [[0, 2 * PAGE, "RW"]]


def test_delete_space_revokes_every_attached_client_first(owner, clients, daemon):
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("backend", 0, MiB)
    backend = clients("backend")
    backend.ok("attach_va", space=space.space_id)
    backend.ok("hold", space=space.space_id, offset=0)
    report = space.delete()
    assert [(c.client, c.outcome) for c in report.clients] == [("backend", "acked")]
    assert owner.list_spaces() == []
    result = backend.cmd("touch_held", space=space.space_id)
    assert result.get("dead"), result
    assert _dead_signal(backend) in (signal.SIGSEGV, signal.SIGBUS)


@pytest.mark.parametrize("mode", ["cooperative", "sealed"])
@pytest.mark.parametrize("action", ["disconnect", "kill", "disconnect-report"])
def test_stopped_client_is_fenced_at_the_deadline_and_others_ack(tmp_path, action, mode):
    from tests.conftest import ClientProc, Daemon, _env, stop_process

    env = dict(_env(), MEMBROKER_FENCE_ACTION=action.split("-")[0])
    if action == "disconnect-report":
        env["MEMBROKER_ON_FENCED_STILL_MAPPED"] = "report"
    fast = Daemon(tmp_path / "rt2", "--revoke-deadline-ms", "1000", env=env)
    procs = []
    try:
        with membroker.connect("vmm", fast.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            for name in ("good", "stuck"):
                space.grant(name, 0, PAGE)
                proc = ClientProc(fast.runtime_dir, name)
                procs.append(proc)
                proc.ok("attach_va", space=space.space_id, mode=mode)
                proc.ok("touch", space=space.space_id, offset=0)
            good, stuck = procs
            stop_process(stuck.pid)
            t0 = time.monotonic()
            report = space.unshare(0, MiB)
            elapsed = time.monotonic() - t0
            outcomes = {c.client: (c.outcome, c.reason) for c in report.clients}
            fence = {c.client: c.fence for c in report.clients}
            assert fence["good"] == ""
            assert outcomes["good"] == ("acked", "")
            assert outcomes["stuck"][0] == "fenced"
            assert outcomes["stuck"][1].startswith("no acknowledgement of seq 4 within 1000 ms")
            # Returns at the deadline plus a small margin, not later.
            assert 1.0 <= elapsed < 6
            # A fenced client loses its grants; the others keep theirs.
            assert [c for c, _ in space.grants()] == ["good"]
            assert sorted(s.client for s in owner.list_sessions()) == ["good", "vmm"]
            assert owner.stats().fenced_total == 1
            if action == "kill":
                assert outcomes["stuck"][1].endswith("; killed with SIGKILL")
                assert fence["stuck"] == "killed"
                assert stuck.wait(10) == -signal.SIGKILL
            elif mode == "sealed":
                # The broker zapped nothing, but it decides every fault of a sealed mapping:
                # the disconnect retired it (write-protected, every touch refused). What the
                # stopped process still has present is page 0, which it held; the report
                # names it, and the kill policy applies.
                if action == "disconnect":
                    assert fence["stuck"] == "killed"
                    assert "present at" in outcomes["stuck"][1]
                    assert stuck.wait(10) == -signal.SIGKILL
                else:
                    assert fence["stuck"] == "still_mapped"
                    assert "still has the page at offset 0x0 present" in outcomes["stuck"][1]
            elif action == "disconnect":
                # Disconnected, but a stopped process cannot drop its mapping: looked at again
                # after the grace, still mapped, so killed (on_fenced_still_mapped = kill).
                assert fence["stuck"] == "killed"
                assert "still reached the space 200 ms after the disconnect" in outcomes["stuck"][1]
                assert outcomes["stuck"][1].endswith(": killed")
                assert stuck.wait(10) == -signal.SIGKILL
            else:
                # on_fenced_still_mapped = report: alive (stopped), and the report says so.
                assert fence["stuck"] == "still_mapped"
                assert "maps offset 0x0 writable" in outcomes["stuck"][1]
                assert stuck.proc.poll() is None
            assert good.ok("ranges", space=space.space_id)["ranges"] == []
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            proc.close()
        assert fast.stop() == 0


def test_a_client_on_its_session_socket_never_loads_grpc(owner, clients, daemon):
    """A VA client that attaches, is revoked, granted and fails a call loads neither grpc nor
    what it brings (asyncio, ssl): the broker walks each of a client's mappings whenever it
    verifies a revocation of it, and those are ~60 of ~200 (membroker.errors). Its errors
    still carry grpc's status codes."""
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("backend", 0, 2 * PAGE)
    backend = clients("backend")
    backend.ok("attach_va", space=space.space_id)
    assert space.revoke("backend", 0, PAGE).all_acked
    space.grant("backend", 0, PAGE)
    # A raise of access is pushed, not acknowledged: the grant returns before the client has
    # applied it.
    deadline = time.monotonic() + 10
    while backend.ok("ranges", space=space.space_id)["ranges"] != [[0, 2 * PAGE, "RW"]]:
        assert time.monotonic() < deadline, "the grant never reached the client"
        time.sleep(0.01)
    backend.ok("write", space=space.space_id, offset=0, data="01")
    failed = backend.cmd("attach_va", space="no-such-space")
    assert failed["error"].startswith("NotFound: "), failed
    loaded = backend.ok("loaded")
    assert loaded["modules"] == [], loaded
    assert not [f for f in loaded["files"] if "grpc" in f or "libssl" in f], loaded["files"]
