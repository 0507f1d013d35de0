"""Sealed VA mode against a real daemon and real client processes, tried the way a compromised
backend would: /proc/self/mem, mprotect/munmap/mremap of its own mapping, a kept fd, a
userfaultfd of its own, writes after a non-cooperative write revoke, writes through a
read-only description."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import membroker
from membroker._sys.kvm import guest_memfd_support
from membroker.clients import sealed_mode_available
from tests.conftest import Daemon, _env, daemon_and_clients, stop_process, wait_until

PAGE = 4096
SIZE = 64 * PAGE

pytestmark = pytest.mark.skipif(
    not sealed_mode_available(),
    reason="the kernel lacks mseal or userfaultfd minor/missing/wp faults on shmem",
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Daemon, Any, Any, Any]]:
    """A daemon, an owner with a 64-page space whose every page holds its own index, shared,
    and a `start(name)` for client processes."""
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(SIZE, name="guest")
        mem = space.map()
        for page in range(SIZE // PAGE):
            mem.write(page * PAGE, bytes([page + 1]) * 8)
        space.share(0, SIZE)
        try:
            yield d, start, space, mem
        finally:
            mem.close()
            owner.close()


def _sigbus(result: dict[str, Any]) -> bool:
    return bool(result.get("dead")) and result["returncode"] == -signal.SIGBUS


def test_sealed_client_reaches_only_what_it_holds(world: Any) -> None:
    d, start, space, mem = world
    space.grant("c", 0, PAGE, "rw")
    c = start("c")
    out = c.ok("attach_va", space=space.space_id)
    assert out["mode"] == "sealed"
    # Nothing is present until touched: the broker faults pages in lazily.
    assert c.ok("present_pages", space=space.space_id)["pages"] == []
    assert c.ok("read", space=space.space_id, offset=0, length=8)["data"] == "01" * 8
    assert c.ok("present_pages", space=space.space_id)["pages"] == [0]
    c.ok("write", space=space.space_id, offset=0, data="aa")
    assert mem.read(0, 1) == b"\xaa"
    # /proc/self/mem (FOLL_FORCE) does not read a page it does not hold, nor write one.
    got = c.ok("procmem_read", space=space.space_id, offset=5 * PAGE)
    assert "data" not in got and got["errno"] in (errno.EIO, errno.EFAULT), got
    # The mapping cannot be re-protected, unmapped or moved.
    attacks = c.ok("mapping_attacks", space=space.space_id)["errno"]
    assert attacks == {"mprotect": errno.EPERM, "munmap": errno.EPERM, "mremap": errno.EPERM}
    sessions = {s.client: s for s in membroker.connect("ops", str(d.runtime_dir)).list_sessions()}
    assert list(sessions["c"].sealed_spaces) == [space.space_id]
    # A touch of page 5 is a SIGBUS; the guest's bytes are unchanged.
    assert _sigbus(c.cmd("touch", space=space.space_id, offset=5 * PAGE))
    assert mem.read(5 * PAGE, 8) == bytes([6]) * 8
    # The refusal is logged by the fault thread after the poison marker went in, so the
    # client may be dead before the line is written.
    assert wait_until(lambda: "touched offset 0x5000, which it does not hold" in d.log())


def test_a_process_attaches_again_after_a_detach(world: Any) -> None:
    """A sealed mapping cannot be unmapped: after a detach it stays, zapped and retired. The
    same process attaching again maps the space a second time; that new mapping is the one
    checked, sealed and served, and the old one stays refused (found by the stateful model
    with a seed: the second attach used to be refused and fenced)."""
    d, start, space, _ = world
    space.grant("c", 0, 2 * PAGE, "rw")
    c = start("c")
    first = c.ok("attach_va", space=space.space_id)
    assert first["mode"] == "sealed"
    assert c.ok("read", space=space.space_id, offset=PAGE, length=8)["data"] == "02" * 8
    c.ok("close", space=space.space_id)
    second = c.ok("attach_va", space=space.space_id)
    assert second["mode"] == "sealed" and second["address"] != first["address"]
    assert c.ok("read", space=space.space_id, offset=PAGE, length=8)["data"] == "02" * 8
    report = space.revoke("c", PAGE, PAGE)
    assert [(r.client, r.outcome) for r in report.clients] == [("c", "acked")]
    assert membroker.connect("ops", str(d.runtime_dir)).stats().fenced_total == 0
    assert _sigbus(c.cmd("touch", space=space.space_id, offset=PAGE))


def test_fault_around_stays_inside_the_grant(world: Any) -> None:
    _d, start, space, _mem = world
    space.grant("c", 0, 16 * PAGE, "ro")
    space.grant("c", 20 * PAGE, 4 * PAGE, "ro")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    assert c.ok("read", space=space.space_id, offset=2 * PAGE, length=8)["data"] == "03" * 8
    present = c.ok("present_pages", space=space.space_id)["pages"]
    # Faulted around from the touched page to the end of its granted run, and no further.
    assert present == list(range(2, 16))
    assert c.ok("read", space=space.space_id, offset=21 * PAGE, length=1)["data"] == "16"
    present = c.ok("present_pages", space=space.space_id)["pages"]
    assert present == [*range(2, 16), 21, 22, 23]


def test_holes_of_the_file_fault_in_as_zeroes(tmp_path: Path) -> None:
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(SIZE)  # never written: every page a hole
        space.share(0, SIZE)
        space.grant("c", 0, 4 * PAGE, "rw")
        c = start("c")
        c.ok("attach_va", space=space.space_id)
        assert c.ok("read", space=space.space_id, offset=PAGE, length=4)["data"] == "00" * 4
        c.ok("write", space=space.space_id, offset=3 * PAGE, data="5a")
        with space.map() as mem:
            assert mem.read(3 * PAGE, 1) == b"\x5a"
        owner.close()


def test_a_revoke_of_many_ranges_zaps_around_what_is_still_held(tmp_path: Path) -> None:
    """200 one-page fragments revoked at once, two pages between them still held: the client
    zaps around the held pages (a few calls, not one per range). Every revoked page is gone
    from its page tables (the broker's verification acks it, and pagemap agrees), the held
    ones stay present, readable, with their contents."""
    pages = 512
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(pages * PAGE)
        with space.map() as mem:
            for page in range(pages):
                mem.write(page * PAGE, page.to_bytes(2, "little"))
        space.share(0, pages * PAGE)
        evens = [(2 * i * PAGE, PAGE) for i in range(200)]
        space.grant_many("c", sorted([*evens, (201 * PAGE, PAGE), (203 * PAGE, PAGE)]), "rw")
        c = start("c")
        c.ok("attach_va", space=space.space_id)
        for page in (0, 2, 200, 201, 203, 250, 398):
            data = c.ok("read", space=space.space_id, offset=page * PAGE, length=2)["data"]
            assert data == page.to_bytes(2, "little").hex()
        before = c.ok("present_pages", space=space.space_id)["pages"]
        assert {0, 2, 200, 201, 202, 203, 204, 250, 398} <= set(before)
        (report,) = space.revoke_many("c", evens)
        assert [(r.client, r.outcome) for r in report.clients] == [("c", "acked")]
        assert report.revoked_bytes == 200 * PAGE
        assert c.ok("present_pages", space=space.space_id)["pages"] == [201, 203]
        assert c.ok("ranges", space=space.space_id)["ranges"] == [
            [201 * PAGE, PAGE, "RW"],
            [203 * PAGE, PAGE, "RW"],
        ]
        assert c.ok("read", space=space.space_id, offset=203 * PAGE, length=2)["data"] == "cb00"
        assert owner.stats().fenced_total == 0
        owner.close()


def test_a_stopped_writer_loses_write_access_without_its_help(world: Any) -> None:
    _d, start, space, mem = world
    space.grant("c", 0, 4 * PAGE, "rw")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    c.ok("write", space=space.space_id, offset=0, data="bb")  # present and writable
    stop_process(c.pid)
    t0 = time.monotonic()
    space.grant("c", 0, 4 * PAGE, "ro")  # rw -> ro while the client is frozen
    took = time.monotonic() - t0
    report = space.revocations()[-1]
    assert [(o.client, o.outcome) for o in report.clients] == [("c", "enforced")]
    assert took < 2.0  # well inside the 2 s deadline: nothing waited for the frozen client
    os.kill(c.pid, signal.SIGCONT)
    # It still reads what it holds; its write does not land.
    assert c.ok("read", space=space.space_id, offset=0, length=1)["data"] == "bb"
    assert _sigbus(c.cmd("poke", space=space.space_id, offset=0, value=0xCC))
    assert mem.read(0, 1) == b"\xbb"


def test_a_read_revoke_zaps_and_a_refault_is_refused(world: Any) -> None:
    _d, start, space, mem = world
    space.grant("c", 0, 8 * PAGE, "rw")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    c.ok("read", space=space.space_id, offset=0, length=8 * PAGE)
    c.ok("hold", space=space.space_id, offset=3 * PAGE)
    report = space.revoke("c", 0, 8 * PAGE)
    assert [(o.client, o.outcome) for o in report.clients] == [("c", "acked")]
    assert c.ok("present_pages", space=space.space_id)["pages"] == []
    assert _sigbus(c.cmd("touch_held", space=space.space_id))
    assert mem.read(3 * PAGE, 1) == b"\x04"


def test_a_child_forked_with_the_mapping_is_killed(world: Any) -> None:
    d, start, space, _mem = world
    space.grant("c", 0, 4 * PAGE, "rw")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    c.ok("read", space=space.space_id, offset=0, length=1)  # present in the parent
    child = c.ok("fork_with_mapping", space=space.space_id, offset=0, sleep=2.0)["child"]
    reaped = c.ok("reap", pid=child)
    # Killed before it could read the page it inherited (it would exit with 101).
    assert reaped["signal"] == signal.SIGKILL, reaped
    assert wait_until(lambda: "forked with its sealed mapping: the child is killed" in d.log())
    # The parent carries on.
    assert c.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "02"


def test_a_regrant_after_a_revoke_faults_in_again(world: Any) -> None:
    _d, start, space, _mem = world
    space.grant("c", 0, 2 * PAGE, "rw")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    assert c.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "02"
    assert space.revoke("c", 0, 2 * PAGE).all_acked
    space.grant("c", 0, 2 * PAGE, "ro")
    # A raise of access is pushed, not acknowledged: wait until the client has applied it.
    assert wait_until(
        lambda: c.ok("ranges", space=space.space_id)["ranges"] == [[0, 2 * PAGE, "RO"]]
    )
    assert c.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "02"
    space.grant("c", 0, 2 * PAGE, "rw")
    assert wait_until(
        lambda: c.ok("ranges", space=space.space_id)["ranges"] == [[0, 2 * PAGE, "RW"]]
    )
    assert c.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "02"
    c.ok("write", space=space.space_id, offset=PAGE, data="77")
    assert c.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "77"


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("keep_fd", "still holds fd"),
        ("no_seal", "missing dc sl"),
        ("own_uffd", "userfaultfd of its own"),
        ("other_uffd", "userfaultfd of its own"),
    ],
)
def test_a_client_that_cheats_at_sealing_is_refused_and_fenced(
    tmp_path: Path, how: str, why: str
) -> None:
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(SIZE)
        space.share(0, SIZE)
        space.grant("c", 0, PAGE, "rw")
        c = start("c")
        out = c.cmd("attach_va_rogue", space=space.space_id, how=how)
        assert not out.get("ok"), out
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "sealed mapping refused" not in d.log():
            time.sleep(0.05)
        assert why in d.log(), d.log()[-2000:]
        stats = owner.stats()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and stats.fenced_total < 1:
            time.sleep(0.05)
            stats = owner.stats()
        assert stats.fenced_total == 1
        owner.close()


def test_a_read_only_sealed_mapping_stays_read_only(world: Any) -> None:
    _d, start, space, _mem = world
    space.grant("c", 0, PAGE, "ro")
    c = start("c")
    c.ok("attach_va", space=space.space_id)
    space.grant("c", 0, PAGE, "rw")
    out = c.cmd("write", space=space.space_id, offset=0, data="01")
    assert not out.get("ok") and "NotHeld" in out["error"]


def test_read_only_grantees_get_read_only_descriptions(world: Any) -> None:
    _d, start, space, mem = world
    space.grant("fdc", 0, 4 * PAGE, "ro")
    c = start("fdc")
    c.ok("attach_fd", space=space.space_id)
    got = c.ok("fd_attacks", space=space.space_id, offset=8 * PAGE)
    assert got["read_only"]
    assert got["errno"] == {"pwrite": errno.EBADF, "punch": errno.EBADF, "mmap_rw": errno.EACCES}
    assert mem.read(8 * PAGE, 8) == bytes([9]) * 8
    # A read-only sealed VA client's mapping is read-only for good: a write is a SIGSEGV.
    space.grant("va", 0, 4 * PAGE, "ro")
    v = start("va")
    v.ok("attach_va", space=space.space_id)
    assert v.ok("read", space=space.space_id, offset=0, length=1)["data"] == "01"
    result = v.cmd("poke", space=space.space_id, offset=0, value=0xEE)
    assert result.get("dead") and result["returncode"] == -signal.SIGSEGV
    assert mem.read(0, 1) == b"\x01"


def test_a_first_rw_grant_upgrades_a_read_only_fd_client(world: Any) -> None:
    _d, start, space, mem = world
    space.grant("fdc", 0, 4 * PAGE, "ro")
    c = start("fdc")
    c.ok("attach_fd", space=space.space_id)
    assert c.ok("fd_attacks", space=space.space_id, offset=0)["read_only"]
    space.grant("fdc", 0, 4 * PAGE, "rw")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = c.ok("fd_attacks", space=space.space_id, offset=0)
        if not got["read_only"]:
            break
        time.sleep(0.02)
    # Now it may write: its pwrite landed, and so did its hole punch (page 0 reads zero).
    assert not got["read_only"]
    assert got["errno"] == {"pwrite": 0, "punch": 0, "mmap_rw": 0}
    assert mem.read(0, 1) == b"\x00"


GMEM_OK, GMEM_WHY = guest_memfd_support()


@pytest.mark.skipif(not GMEM_OK, reason=GMEM_WHY)
def test_guest_memfd_spaces_fall_back_to_cooperative_and_say_so(tmp_path: Path) -> None:
    """On 6.18 a guest_memfd mapping cannot be registered with a userfaultfd: the broker finds
    that out itself and attaches VA clients of such a space cooperatively; a client that
    insists on sealed mode is told it cannot have it."""
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(SIZE, backing="guest_memfd")
        space.share(0, SIZE)
        space.grant("c", 0, PAGE, "rw")
        space.grant("strict", 0, PAGE, "rw")
        c = start("c")
        assert c.ok("attach_va", space=space.space_id)["mode"] == "cooperative"
        assert "sealed mode unavailable (userfaultfd registration" in d.log()
        strict = start("strict")
        out = strict.cmd("attach_va", space=space.space_id, mode="sealed")
        assert not out["ok"] and "KernelFeatureMissing" in out["error"], out
        sessions = {s.client: s for s in owner.list_sessions()}
        assert list(sessions["c"].sealed_spaces) == []
        assert list(sessions["strict"].attached_spaces) == []  # let go of, not left behind
        owner.close()


def test_sealed_mode_can_be_required(tmp_path: Path) -> None:
    env_extra = {"MEMBROKER_VA_MODE": "sealed"}
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "2000", env=dict(_env(), **env_extra))
    try:
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(SIZE)
        space.share(0, SIZE)
        space.grant("c", 0, PAGE, "rw")
        client = membroker.connect("c", str(d.runtime_dir))
        with pytest.raises(membroker.errors.PermissionDenied, match="requires sealed VA mode"):
            client.attach_va(space.space_id, mode="cooperative")
        client.close()
        owner.close()
    finally:
        assert d.stop() == 0, d.log()


HUGE = 2 << 20


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """Four free 2 MiB huge pages for the test (root raises the pool; what was added is taken
    back afterwards, from the pool's size at that moment)."""
    from membroker._sys import hugetlb_free_pages

    path = Path("/proc/sys/vm/nr_hugepages")
    with open("/proc/meminfo") as f:
        default_kb = next(int(x.split()[1]) for x in f if x.startswith("Hugepagesize:"))
    if default_kb != HUGE // 1024:
        path = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE // 1024}kB/nr_hugepages")
    added = max(0, 4 - hugetlb_free_pages(HUGE))
    if added:
        if os.geteuid() != 0:
            pytest.skip("needs 4 free 2 MiB huge pages and root to reserve them")
        path.write_text(str(int(path.read_text()) + added))
    try:
        yield
    finally:
        if added:
            path.write_text(str(max(0, int(path.read_text()) - added)))


def test_a_hugetlb_space_is_sealed_in_huge_pages(tmp_path: Path, huge_pages: None) -> None:
    """The broker's own probe finds userfaultfd works on a hugetlb memfd: faults are served a
    2 MiB page at a time, and a touch of a huge page not held is a SIGBUS."""
    with daemon_and_clients(tmp_path, 2000, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(4 * HUGE, backing="memfd-hugetlb", huge_page_size=HUGE)
        with space.map() as mem:
            mem.write(0, b"huge0")
            mem.write(HUGE, b"huge1")
            space.share(0, 4 * HUGE)
            space.grant("c", 0, HUGE, "rw")
            c = start("c")
            assert c.ok("attach_va", space=space.space_id)["mode"] == "sealed"
            assert c.ok("read", space=space.space_id, offset=0, length=5)["data"] == b"huge0".hex()
            c.ok("write", space=space.space_id, offset=HUGE - 1, data="7e")
            assert mem.read(HUGE - 1, 1) == b"\x7e"
            assert _sigbus(c.cmd("touch", space=space.space_id, offset=HUGE))
            assert mem.read(HUGE, 5) == b"huge1"
        # Every hold on the huge pages goes before the pool is shrunk back: the space, the
        # owner's fd of it (a page still in use would stay behind as a surplus page).
        space.delete()
        space.close()
        owner.close()
