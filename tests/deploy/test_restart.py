"""Memory outlives the process: membrokerd restarted under a real systemd manager (`systemd
--user`, see deploy_helpers.UserManager) keeps its spaces, their bytes, attributes and grants.

The shipped unit has FileDescriptorStoreMax=4096: every space's fd goes to systemd's fd store
(FDSTORE=1, FDNAME=<space id>) and the journal (state_dir) holds what defines the space and its
access table. After `kill -9` (Restart=on-failure restarts it) or `systemctl restart`, the new
daemon takes the fds back from LISTEN_FDS and restores the spaces: an owner that reconnects
under the same client name (and uid) finds its space by id, reads back every byte, and sees the
same grants. `systemctl stop` empties the fd store: the spaces are then gone (and dropped from
the journal, with a log line saying why). Connected sessions resume by themselves (their resume
tokens are in the journal), across kill -9, restart and a live upgrade (`membrokerctl
upgrade`: re-executed in place, same main pid); a reload does not even drop them.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from deploy_helpers import SERVICE, UserManager, child_env, samples

import membroker
from membroker._sys.kvm import guest_memfd_support
from membroker._sys.proc import fd_targets
from membroker.errors import BrokerRestarting
from membroker.types import Region
from membrokerd.journal import WRITE_KINDS, read_log
from tests.conftest import wait_for

MiB = 1 << 20
PAGE = 4096
T = TypeVar("T")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int) -> int:
    """The daemon's fd count once closed sessions are cleaned up (stable for 0.3 s)."""
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n = _fds(pid)
        if n != last:
            last, stable_since = n, time.monotonic()
        elif time.monotonic() - stable_since > 0.3:
            return n
        time.sleep(0.05)
    return last


def _wait_restarted(sd: UserManager, old_pid: int) -> int:
    def restarted() -> bool:
        s = sd.show(SERVICE, "ActiveState", "MainPID")
        return s["ActiveState"] == "active" and s["MainPID"] not in ("0", str(old_pid))

    sd.wait_for("the restart", restarted, timeout=30)
    return sd.main_pid()


SIZE = 256 * MiB  # sparse: only DATA bytes are written
DATA = 8 * MiB


def _generation(path: Path) -> int:
    """A change log file's generation: the order its records were written in."""
    return int(path.name.split(".")[1])


def _make_guest(sd: UserManager) -> tuple[str, bytes, list[tuple[str, object]], object]:
    """An owner 'vmm' creates a space, writes bytes, shares most of it and grants ranges to
    three client names (one with 20,000 fragments: its later changes are journaled as logged
    operations, not snapshots); returns (space id, contents, grants, space info)."""
    rng = random.Random(7)
    data = rng.randbytes(DATA)
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        space = owner.create_space(SIZE, name="guest-1", regions=[Region(1 << 32, 0, SIZE)])
        assert space.fd is not None
        os.pwrite(space.fd, data, 0)
        space.share(0, SIZE - 64 * MiB)
        space.grant("backend", 0, 2 * MiB, "rw")
        space.grant("backend", 3 * MiB, MiB, "ro")
        space.grant_many("frag", [(i * 2 * PAGE, PAGE) for i in range(20_000)], "ro")
        for i in range(20):
            space.grant("frag", (i * 2 + 1) * PAGE, PAGE, "rw")
        space.revoke("frag", 100 * PAGE, 50 * PAGE)
        # Grants outlive the attribute: these pages go private, the grant records stay.
        space.unshare(3 * MiB + MiB // 2, MiB // 2)
        grants = owner.list_grants(space.space_id)
        info = owner.get_space(space.space_id)
        space.close()
    return space.space_id, data, grants, info


def _check_guest(
    sd: UserManager, space_id: str, data: bytes, grants: list[tuple[str, object]], info: object
) -> None:
    """A new owner session under the same name finds the space, its grants and its bytes."""
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert owner.get_space(space_id) == info
        assert [s.space_id for s in owner.list_spaces()] == [space_id]
        assert owner.list_grants(space_id) == grants
        client = owner.attach_fd(space_id)
        try:
            assert client.fd is not None
            got = os.pread(client.fd, len(data), 0)
            assert os.fstat(client.fd).st_size == SIZE
        finally:
            client.close()
        assert got == data
        # It is the owner's still: it can change access, and the seq goes on from where it was.
        space = owner.space(space_id)
        report = space.revoke("frag", 0, PAGE)
        assert report.seq == info.seq + 1  # type: ignore[attr-defined]


def test_kill_9_restart_keeps_spaces_bytes_and_grants(sd: UserManager) -> None:
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    assert sd.show(SERVICE, "FileDescriptorStoreMax")["FileDescriptorStoreMax"] == "4096"
    idle = _settled_fds(pid)
    space_id, data, grants, info = _make_guest(sd)
    with_space = _settled_fds(pid)
    assert sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    # The large client's later changes sit in the journal as logged operations: in the
    # database (folded) or still in the change log, which only the restart can fold in.
    state_dir = sd.runtime_dir.with_name("membroker.state")
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        folded = db.execute("SELECT count(*) FROM ops WHERE client = 'frag'").fetchone()[0]
    finally:
        db.close()
    in_log = [
        op
        for path in sorted(state_dir.glob("changes.*.log"), key=_generation)
        for change in read_log(path.read_bytes(), path)[0]
        for op in change.ops
        if op.client == "frag"
    ]
    assert in_log and folded + len(in_log) > 10, (folded, len(in_log))

    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    new_pid = _wait_restarted(sd, pid)
    took = time.monotonic() - t0
    log = sd.log_text()
    assert f"space {space_id} restored" in log, log
    assert "1 space(s) restored" in log, log
    assert "log file(s) folded into" in log, log
    # Back to where it was: the space's fd (and nothing else kept from the store), no leak.
    assert _settled_fds(new_pid) == with_space, (idle, with_space)
    _check_guest(sd, space_id, data, grants, info)
    assert _settled_fds(new_pid) == with_space
    print(f"kill -9 -> active again with the space restored in {took:.2f} s; fds {with_space}")


def test_kill_9_keeps_a_change_too_large_for_the_change_log(sd: UserManager) -> None:
    """A grant of 70,000 ranges (1.1 MB of sets) is folded into the database on the
    journal's thread rather than appended on the loop; the small grant after it goes to the
    change log. Both come back after a kill -9, in that order."""
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    big = [(i * 2 * PAGE, PAGE) for i in range(70_000)]
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        space = owner.create_space(1 << 30)  # sparse
        space.share(0, 1 << 30)
        space.grant_many("big", big, "ro")
        space.grant("big", PAGE, PAGE, "rw")  # an operation on the large set, logged after it
        space.grant("small", 0, PAGE, "rw")
        before = owner.list_grants(space.space_id)
        space.close()
    state_dir = sd.runtime_dir.with_name("membroker.state")
    logged = [
        change
        for path in sorted(state_dir.glob("changes.*.log"), key=_generation)
        for change in read_log(path.read_bytes(), path)[0]
    ]
    assert [sorted(c.clients) or [op.client for op in c.ops] for c in logged][-2:] == [
        ["big"],
        ["small"],
    ]
    assert all(len(op.spans) < len(big) for c in logged for op in c.ops)  # not in the log
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(sd, pid)
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert owner.list_grants(space.space_id) == before
    assert sum(1 for c, _ in before if c == "big") == 70_000 - 1 + 2  # page 1 joined 0 and 2


def test_systemctl_restart_keeps_spaces_and_stop_drops_them(sd: UserManager) -> None:
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    space_id, data, grants, info = _make_guest(sd)
    with_space = _settled_fds(pid)

    sd.systemctl("restart", SERVICE)
    new_pid = sd.main_pid()
    assert new_pid != pid
    assert sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "1"
    assert _settled_fds(new_pid) == with_space
    _check_guest(sd, space_id, data, grants, info)

    # A second restart: restored spaces are restored again (their fds stayed in the store),
    # with the change made since (a logged operation on a large client, replayed).
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        grants = owner.list_grants(space_id)
        info = owner.get_space(space_id)
    sd.systemctl("restart", SERVICE)
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert owner.get_space(space_id) == info
        assert owner.list_grants(space_id) == grants

    # stop empties the fd store: the next start has no fd for the journal's space.
    sd.systemctl("stop", SERVICE)
    sd.systemctl("start", SERVICE)
    assert sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "0"
    log = sd.log_text()
    assert f"journal: space {space_id} ('guest-1', owner 'vmm' uid 0" in log, log
    assert "has no fd in systemd's fd store" in log
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert owner.list_spaces() == []
        with pytest.raises(membroker.MembrokerError):
            owner.get_space(space_id)


def test_systemctl_stop_ends_sessions_and_restart_resumes_them(sd: UserManager) -> None:
    """A connected session is told what is happening: across `systemctl restart` it resumes
    (its space is still there); at `systemctl stop`, which empties the fd store and so ends
    the spaces, it ends at once, saying so, instead of retrying for its resume window. The
    daemon asks the manager which job stops it."""
    sd.systemctl("start", SERVICE)
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        space = owner.create_space(MiB)
        sd.systemctl("restart", SERVICE)
        assert _retrying(lambda: owner.get_space(space.space_id)).space_id == space.space_id
        assert not owner.closed
        sd.systemctl("stop", SERVICE)
        wait_for("the session to end", lambda: owner.closed, timeout=10)
        assert "spaces are gone" in (owner.closed_reason or ""), owner.closed_reason
        with pytest.raises(membroker.SessionClosed, match="spaces are gone"):
            owner.list_spaces()


def test_kill_9_during_a_burst_of_grants_keeps_every_returned_grant(sd: UserManager) -> None:
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    pages = 4096
    owner = membroker.connect("vmm", str(sd.runtime_dir))
    returned: list[int] = []
    failed: list[BaseException] = []
    try:
        space = owner.create_space(pages * PAGE)
        space.share(0, pages * PAGE)
        space_id = space.space_id
        space.close()

        def burst() -> None:
            for i in range(0, pages, 2):
                try:
                    space.grant("burst", i * PAGE, PAGE, "rw" if i % 4 else "ro")
                except Exception as exc:  # the daemon died under this call
                    failed.append(exc)
                    return
                returned.append(i)

        thread = threading.Thread(target=burst)
        thread.start()
        deadline = time.monotonic() + 20
        while len(returned) < 200 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        owner.close()
    assert len(returned) >= 200, (len(returned), failed)
    assert failed, "the burst ran to its end before the kill"

    _wait_restarted(sd, pid)
    with membroker.connect("vmm", str(sd.runtime_dir)) as again:
        held = again.list_grants(space_id, "burst")
    granted = {r.offset // PAGE: r for _, r in held}
    pages_held: dict[int, str] = {}
    for offset_page, r in granted.items():
        for p in range(offset_page, offset_page + r.length // PAGE):
            pages_held[p] = r.access.name
    missing = [i for i in returned if i not in pages_held]
    assert not missing, f"{len(missing)} returned grants lost, first {missing[:5]}"
    for i in returned:
        assert pages_held[i] == ("RW" if i % 4 else "RO"), i
    # At most the one call in flight at the kill may have been committed without returning.
    extra = sorted(set(pages_held) - set(returned))
    assert len(extra) <= 1, extra
    print(
        f"kill -9 after {len(returned)} returned grants: all {len(returned)} restored, "
        f"{len(extra)} in-flight grant(s) committed"
    )


def test_imported_space_survives_kill_9(sd: UserManager) -> None:
    """An imported memfd comes back too: the owner's own fd and the broker's restored one are
    still the same memory, and its seals were checked against the journal."""
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    size = 4 * MiB
    mine = os.memfd_create("vmm-ram", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(mine, size)
        with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
            space = owner.import_space(mine, name="imported")
            space.share(0, size)
            space.grant("backend", 0, MiB, "rw")
            info = owner.get_space(space.space_id)
            grants = owner.list_grants(space.space_id)
        os.kill(pid, signal.SIGKILL)
        _wait_restarted(sd, pid)
        os.pwrite(mine, b"after the restart", 12345)
        with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
            assert owner.get_space(space.space_id) == info
            assert info.imported
            assert owner.list_grants(space.space_id) == grants
            client = owner.attach_fd(space.space_id)
            try:
                assert client.fd is not None
                assert os.pread(client.fd, 17, 12345) == b"after the restart"
            finally:
                client.close()
            # Deleting it removes it from the fd store (FDSTOREREMOVE=1) and the journal.
            owner.space(space.space_id).delete()
        sd.wait_for(
            "the fd store to empty",
            lambda: sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "0",
        )
    finally:
        os.close(mine)


@pytest.mark.parametrize("backing", ["guest_memfd", "memfd-hugetlb"])
def test_guest_memfd_and_hugetlb_spaces_survive_kill_9(
    sd: UserManager, backing: str, huge_pages_2m: Callable[[int], None]
) -> None:
    """The other backings come back from the fd store too (a guest_memfd has no seals to
    compare: its row says so), with their bytes: written through one mapping before the kill,
    read through a new one after."""
    import mmap

    mark = b"guest bytes kept across the kill"
    if backing == "guest_memfd" and not guest_memfd_support()[0]:
        pytest.skip(f"no mappable guest_memfd here: {guest_memfd_support()[1]}")
    size = 4 * MiB
    extra: dict[str, int] = {}
    if backing == "memfd-hugetlb":
        huge_pages_2m(size // (2 * MiB))  # reserved for this test, given back after it
        extra["huge_page_size"] = 2 * MiB
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        space = owner.create_space(size, name="other", backing=backing, **extra)
        space.share(0, size)
        space.grant("backend", 0, 2 * MiB, "rw")
        info = owner.get_space(space.space_id)
        assert info.backing == backing
        grants = owner.list_grants(space.space_id)
        client = owner.attach_fd(space.space_id)
        try:
            assert client.fd is not None
            with mmap.mmap(client.fd, size, mmap.MAP_SHARED) as mem:
                mem[12345 : 12345 + len(mark)] = mark
        finally:
            client.close()
        space.close()  # the owner's own fd of it: only the daemon's copies are left
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(sd, pid)
    assert f"space {space.space_id} restored" in sd.log_text()
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert owner.get_space(space.space_id) == info
        assert owner.list_grants(space.space_id) == grants
        client = owner.attach_fd(space.space_id)
        try:
            assert client.fd is not None
            with mmap.mmap(client.fd, size, mmap.MAP_SHARED) as mem:
                assert mem[12345 : 12345 + len(mark)] == mark
        finally:
            client.close()
        owner.space(space.space_id).delete()
    # Gone from the daemon and from the fd store: nothing holds the memory (or, for hugetlb,
    # the huge pages this test reserved and gives back) once the test is over.
    sd.wait_for(
        "the fd store to empty",
        lambda: sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "0",
    )
    sd.systemctl("stop", SERVICE)


_PINNER = r"""
import sys, time
import membroker
s = membroker.connect("victim", sys.argv[1])
c = s.attach_fd(sys.argv[2])
c.pin(0, 4096)
print("pinned", flush=True)
time.sleep(60)
"""


def test_a_fenced_clients_grants_stay_dropped_after_a_restart(sd: UserManager) -> None:
    """A fence drops the client's grants in every space (the owner must grant again): the
    journal says so too, so a restart does not bring them back. In the space it is revoked in,
    the revocation's own record drops them; in the other space only the fence's record
    does."""
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        other = owner.create_space(MiB)
        other.share(0, MiB)
        other.grant("victim", 0, MiB, "rw")
        other.grant("bystander", 0, MiB, "ro")
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("victim", 0, MiB, "rw")
        space.grant("bystander", 0, MiB, "ro")
        victim = subprocess.Popen(
            [sys.executable, "-c", _PINNER, str(sd.runtime_dir), space.space_id],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            assert victim.stdout is not None
            assert victim.stdout.readline().strip() == "pinned"
            report = space.revoke("victim", 0, 4096, on_pinned="fence")
            assert [c.outcome for c in report.clients] == ["fenced"], report
            assert [c for c, _ in owner.list_grants(space.space_id)] == ["bystander"]
            assert [c for c, _ in owner.list_grants(other.space_id)] == ["bystander"]
        finally:
            victim.kill()
            victim.wait()
            if victim.stdout is not None:
                victim.stdout.close()
    # The fence's drop went to the journal before the revoke reported it.
    os.kill(pid, signal.SIGKILL)
    _wait_restarted(sd, pid)
    with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
        assert [c for c, _ in owner.list_grants(space.space_id)] == ["bystander"]
        assert [c for c, _ in owner.list_grants(other.space_id)] == ["bystander"]


def test_a_failed_journal_write_fails_the_call_but_the_change_is_in_force(
    tmp_path: Path,
) -> None:
    """The journal's change log stops taking writes (immutable): a grant is still carried out
    (the table changed; clients would be told), and its call fails (the log says it is not
    journaled), leaving the log as it was. The next change writes the client's set whole again
    once the journal works, and a clean stop folds the log into the database."""
    from deploy_helpers import Daemon, require_tool

    chattr = require_tool("chattr")
    d = Daemon(tmp_path / "rt")
    state_dir = tmp_path / "rt.state"
    try:
        with membroker.connect("vmm", str(d.runtime_dir)) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            [changes] = state_dir.glob("changes.*.log")
            before = changes.read_bytes()
            assert read_log(before, changes)[1] == len(before) > 0  # the share: one record
            if subprocess.run([chattr, "+i", str(changes)], capture_output=True).returncode:
                pytest.skip("chattr +i does not work on this file system")
            try:
                # An INTERNAL error; the broker's log says what happened.
                with pytest.raises(membroker.MembrokerError, match="internal error in Grant"):
                    space.grant("backend", 0, PAGE, "rw")
            finally:
                subprocess.run([chattr, "-i", str(changes)], check=True)
            assert changes.read_bytes() == before
            assert _journal_errors(d) == {"append": 1, "fold": 0, "write": 0, "unfolded": 0}
            assert [c for c, _ in owner.list_grants(space.space_id)] == ["backend"]
            space.grant("backend", PAGE, PAGE, "ro")
            [after] = read_log(changes.read_bytes(), changes)[0][-1:]
            [backend] = after.clients.values()
            assert backend is not None and len(backend.readable) == 1  # pages 0-1, whole
    finally:
        assert d.stop() == 0, d.log()
    assert not list(state_dir.glob("changes.*.log"))  # folded at the stop
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        [(length,)] = db.execute("SELECT length(readable_starts) FROM grants").fetchall()
    finally:
        db.close()
    assert length == 8  # pages 0-1 as one range: both grants are in the journal
    log = d.log()
    assert "journal write failed" in log and "it will not survive a restart" in log, log


def test_a_space_creation_waits_for_the_journal_without_stopping_the_daemon(
    tmp_path: Path,
) -> None:
    """Another writer holds the journal's database (as a long fold would, or a slow disk): a
    space creation waits for it, and meanwhile the daemon serves everyone else: ListSpaces, a
    ping and a grant (appended to the change log) return while the creation is still waiting,
    and the space being created is listed nowhere (nothing can attach to it or change it
    before its row is in). Once the database is free the creation returns, with its space in
    the journal and listed."""
    from deploy_helpers import Daemon

    d = Daemon(tmp_path / "rt")
    state_dir = tmp_path / "rt.state"
    created: list[membroker.Space] = []
    failed: list[BaseException] = []
    try:
        with (
            membroker.connect("vmm", str(d.runtime_dir)) as owner,
            membroker.connect("vmm2", str(d.runtime_dir)) as creator,
        ):
            space = owner.create_space(MiB)
            space.share(0, MiB)
            db = sqlite3.connect(state_dir / "journal.sqlite", isolation_level=None, timeout=5)
            try:
                db.execute("BEGIN IMMEDIATE")  # the write lock, until the rollback below

                def create() -> None:
                    try:
                        created.append(creator.create_space(MiB, name="late"))
                    except BaseException as exc:
                        failed.append(exc)

                thread = threading.Thread(target=create)
                thread.start()
                # The creation reached the daemon (its memfd, named after the space, is made)
                # and waits for the journal's thread.
                wait_for(
                    "the creation to reach the daemon",
                    lambda: "/memfd:membroker:late (deleted)" in fd_targets(d.pid),
                    timeout=10,
                )
                assert [s.space_id for s in owner.list_spaces()] == [space.space_id]
                owner.ping()
                space.grant("backend", 0, PAGE, "rw")
                assert thread.is_alive() and not created and not failed
                db.execute("ROLLBACK")
            finally:
                db.close()
            thread.join(30)
            assert not thread.is_alive() and not failed, failed
            [late] = created
            assert late.space_id in {s.space_id for s in owner.list_spaces()}
            assert [c for c, _ in owner.list_grants(space.space_id)] == ["backend"]
    finally:
        assert d.stop() == 0, d.log()
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        ids = {space_id for (space_id,) in db.execute("SELECT space_id FROM spaces")}
    finally:
        db.close()
    assert ids == {space.space_id, late.space_id}


def test_a_space_creation_given_up_while_the_journal_waits_is_kept(tmp_path: Path) -> None:
    """The caller of a CreateSpace waiting for the journal gives up (its deadline: the SDK
    sends CallCancelled). As its message says, the change runs to its end: the space is listed
    only once the journal takes the row, then with its owner, and is in the database; the
    daemon holds one more fd (the space's) and nothing else."""
    from deploy_helpers import Daemon

    from membroker.v1 import broker_pb2 as pb

    d = Daemon(tmp_path / "rt")
    state_dir = tmp_path / "rt.state"
    try:
        with membroker.connect("vmm", str(d.runtime_dir)) as owner:
            owner.create_space(MiB)
            fds = len(os.listdir(f"/proc/{d.pid}/fd"))
            db = sqlite3.connect(state_dir / "journal.sqlite", isolation_level=None, timeout=5)
            try:
                db.execute("BEGIN IMMEDIATE")
                request = pb.CreateSpaceRequest(size=MiB, name="given-up", backing=pb.BACKING_MEMFD)
                with pytest.raises(membroker.MembrokerError, match="deadline exceeded"):
                    owner.call("CreateSpace", request, timeout=0.5)
                assert "given-up" not in {s.name for s in owner.list_spaces()}
                db.execute("ROLLBACK")
            finally:
                db.close()
            wait_for(
                "the given-up space to be created",
                lambda: "given-up" in {s.name for s in owner.list_spaces()},
                timeout=15,
            )
            [given_up] = [s for s in owner.list_spaces() if s.name == "given-up"]
            assert given_up.owner == "vmm"
            assert len(os.listdir(f"/proc/{d.pid}/fd")) == fds + 1
            owner.ping()
    finally:
        assert d.stop() == 0, d.log()
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT owner FROM spaces WHERE name = 'given-up'").fetchall() == [
            ("vmm",)
        ]
    finally:
        db.close()


def test_a_space_the_journal_refuses_is_undone(tmp_path: Path) -> None:
    """The journal's database takes no writes (its WAL immutable): CreateSpace fails, naming
    no space; the daemon holds no new fd and lists no new space. Once the database takes
    writes again, a creation succeeds."""
    from deploy_helpers import Daemon, require_tool

    chattr = require_tool("chattr")
    d = Daemon(tmp_path / "rt")
    wal = tmp_path / "rt.state" / "journal.sqlite-wal"
    try:
        with membroker.connect("vmm", str(d.runtime_dir)) as owner:
            first = owner.create_space(MiB)
            fds = len(os.listdir(f"/proc/{d.pid}/fd"))
            if subprocess.run([chattr, "+i", str(wal)], capture_output=True).returncode:
                pytest.skip("chattr +i does not work on this file system")
            try:
                with pytest.raises(membroker.MembrokerError, match="internal error in CreateSpace"):
                    owner.create_space(MiB, name="refused")
            finally:
                subprocess.run([chattr, "-i", str(wal)], check=True)
            assert [s.space_id for s in owner.list_spaces()] == [first.space_id]
            assert len(os.listdir(f"/proc/{d.pid}/fd")) == fds
            assert _journal_errors(d) == {"append": 0, "fold": 0, "write": 1, "unfolded": 0}
            second = owner.create_space(MiB, name="taken")
            assert {s.name for s in owner.list_spaces()} == {first.space_id, "taken"}
            second.close()
    finally:
        assert d.stop() == 0, d.log()
    assert "cannot record new space" in d.log()


def _journal_errors(d: Any) -> dict[str, float]:
    """membroker_journal_errors_total by write kind, and the unfolded generations, scraped."""
    found = samples(d.scrape()[1])
    out = {k: found[f'membroker_journal_errors_total{{write="{k}"}}'] for k in WRITE_KINDS}
    out["unfolded"] = found["membroker_journal_unfolded_generations"]
    return out


RESUME_CLIENT = Path(__file__).resolve().parents[1] / "integration" / "resume_client.py"


def _retrying(call: Callable[[], T], timeout: float = 30) -> T:
    """`call()` once the daemon is back (BrokerRestarting until then: retryable)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except BrokerRestarting as exc:
            assert exc.retryable
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_va_clients_resume_across_reload_kill_9_restart_and_upgrade(sd: UserManager) -> None:
    """Two client processes, one holding a cooperative VaClient and one a sealed one, and the
    owner in this process ride through every way the daemon goes away: each time the clients
    resume by themselves, still read through their old mappings, and a revoke after the
    resume is acknowledged and verified; the daemon's fd count comes back to its baseline."""
    from membroker.clients import sealed_mode_available
    from tests.conftest import PeerProc

    modes = {"backend": "cooperative"}
    if sealed_mode_available():
        modes["sealer"] = "sealed"
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    data = random.Random(5).randbytes(64 * 1024)
    owner = membroker.connect("vmm", str(sd.runtime_dir))
    clients: dict[str, PeerProc] = {}
    try:
        space = owner.create_space(8 * MiB, name="guest")
        assert space.fd is not None
        os.pwrite(space.fd, data, 0)
        space.close()
        space.share(0, 8 * MiB)
        for name, mode in modes.items():
            space.grant(name, 0, 8 * MiB, "rw")
            clients[name] = PeerProc(RESUME_CLIENT, sd.runtime_dir, name)
            attached = clients[name].cmd("attach_va", space=space.space_id, mode=mode)
            if mode == "sealed" and attached.get("error") == "KernelFeatureMissing":
                # The unit's sandbox may keep the daemon from serving sealed mode.
                clients.pop(name).close()
                continue
            assert attached.get("mode") == mode, attached
        baseline = _settled_fds(pid)
        resumes = 0
        actions = ("reload", "kill -9", "restart", "upgrade", "restart again")
        for page, action in enumerate(actions, start=1):
            if action == "reload":
                sd.systemctl("reload", SERVICE)
            elif action == "kill -9":
                os.kill(pid, signal.SIGKILL)
                pid = _wait_restarted(sd, pid)
            elif action.startswith("restart"):
                sd.systemctl("restart", SERVICE)
                pid = sd.main_pid()
            else:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "membroker.ctl",
                        "--runtime-dir",
                        str(sd.runtime_dir),
                        "upgrade",
                    ],
                    env=child_env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert out.returncode == 0, out.stderr + sd.status()
                assert f"membrokerd {pid} upgraded in place" in out.stdout
                # Same process: systemd's main pid did not change, and it is running.
                assert sd.show(SERVICE, "ActiveState", "MainPID") == {
                    "ActiveState": "active",
                    "MainPID": str(pid),
                }
                assert "upgrade: this process took over 3 fd(s)" in sd.log_text()
            if action != "reload":
                resumes += 1
            offset = MiB + page * PAGE
            handle = owner.space(space.space_id) if action == "reload" else None
            handle = handle or _retrying(lambda: owner.space(space.space_id))
            for name, client in clients.items():
                wait_for(
                    f"{name} to resume after {action}",
                    lambda c=client, n=resumes: c.ok("status")["resumed"] == n,  # type: ignore[misc]
                )
                status = client.ok("status")
                assert status["dropped"] is None and status["closed"] is None, (action, status)
                assert status["resumes"] == resumes
                got = client.ok("read", offset=0, length=len(data))["data"]
                assert got == data.hex(), (name, action)
                report = handle.revoke(name, offset, PAGE)
                outcomes = [(c.client, c.outcome) for c in report.clients]
                assert outcomes == [(name, "acked")], (action, report)
                assert client.ok("holds", offset=offset, length=PAGE)["holds"] is False
            assert sd.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"] == "1"
            # After the upgrade the daemon relays control.sock to gRPC: one socket more.
            extra = 1 if action == "upgrade" else 0
            assert _settled_fds(pid) == baseline + extra, (action, baseline)
        assert owner.resumes == resumes
        resyncs = [r for r in owner.list_revocations(space.space_id) if r.cause == "resume"]
        assert len(resyncs) >= 1  # the history is the current daemon's
        assert all(c.outcome == "acked" for r in resyncs for c in r.clients)
    finally:
        for client in clients.values():
            client.close()
        owner.close()
