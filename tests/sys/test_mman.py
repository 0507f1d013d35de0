"""Shared mappings: protection, zero-copy views, discard, guard regions, VMA accounting."""

from __future__ import annotations

import errno
import gc
import os
import signal
from collections.abc import Callable, Iterator

import pytest

from membroker._sys import (
    F_SEAL_WRITE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    KernelFeatureMissing,
    Mapping,
    add_seals,
    create_memfd,
    mapping_count_for_inode,
    vma_count,
)

RW = PROT_READ | PROT_WRITE
Child = Callable[[Callable[[], object]], int]


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = create_memfd("mman-test", 16 * PAGE_SIZE)
    yield fd
    os.close(fd)


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def test_map_read_write_view(memfd: int) -> None:
    with Mapping.map_shared(memfd, 16 * PAGE_SIZE, RW) as m:
        assert m.length == 16 * PAGE_SIZE
        assert m.address % PAGE_SIZE == 0
        m.write(PAGE_SIZE + 3, b"guest")
        assert m.read(PAGE_SIZE + 3, 5) == b"guest"
        assert os.pread(memfd, 5, PAGE_SIZE + 3) == b"guest"  # same page cache
        v = m.view(PAGE_SIZE, PAGE_SIZE)
        assert (v.format, v.nbytes, v.readonly) == ("B", PAGE_SIZE, False)
        assert bytes(v[3:8]) == b"guest"
        v[0:2] = b"ok"  # zero-copy: visible through the fd at once
        assert os.pread(memfd, 2, PAGE_SIZE) == b"ok"
        m.write(0, bytearray(b"ba"))
        m.write(2, memoryview(b"mv"))
        assert m.read(0, 4) == b"bamv"
        assert m.read(0, 0) == b""
        v.release()


def test_readinto_and_writes_from_any_buffer(memfd: int) -> None:
    import array

    with Mapping.map_shared(memfd, 16 * PAGE_SIZE, RW) as m:
        words = array.array("I", [0x01020304, 0x05060708])
        m.write(8, memoryview(words))  # another item size: copied as its bytes
        m.write(16, bytearray(b"abc"))
        buf = bytearray(11)
        assert m.readinto(8, buf) == 11
        assert bytes(buf) == words.tobytes() + b"abc"
        window = memoryview(bytearray(8))[2:5]
        assert m.readinto(16, window) == 3 and bytes(window) == b"abc"
        with pytest.raises(ValueError, match="outside the mapping"):
            m.readinto(16 * PAGE_SIZE - 2, bytearray(4))


def test_mapping_lifecycle_and_repr(memfd: int) -> None:
    dev, ino = _inode(memfd)
    m = Mapping.map_shared(memfd, 4 * PAGE_SIZE)
    assert mapping_count_for_inode(os.getpid(), dev, ino) == 1
    assert repr(m) == f"<Mapping address={m.address:#x} length={4 * PAGE_SIZE:#x} open>"
    assert m.closed is False
    m.close()
    m.close()  # idempotent
    assert m.closed is True
    assert repr(m) == f"<Mapping address={m.address:#x} length={4 * PAGE_SIZE:#x} closed>"
    assert mapping_count_for_inode(os.getpid(), dev, ino) == 0
    with pytest.raises(ValueError, match="closed"):
        m.read(0, 1)
    with pytest.raises(ValueError, match="closed"):
        m.protect(0, PAGE_SIZE, PROT_READ)


def test_mapping_survives_closing_the_fd() -> None:
    fd = create_memfd("short-lived-fd", PAGE_SIZE)
    m = Mapping.map_shared(fd, PAGE_SIZE, RW)
    os.close(fd)
    with m:
        m.write(0, b"still here")
        assert m.read(0, 10) == b"still here"


def test_garbage_collected_mapping_is_unmapped(memfd: int) -> None:
    dev, ino = _inode(memfd)
    Mapping.map_shared(memfd, PAGE_SIZE)
    gc.collect()
    assert mapping_count_for_inode(os.getpid(), dev, ino) == 0


def test_protect_sub_range(memfd: int, child: Child) -> None:
    with Mapping.map_shared(memfd, 4 * PAGE_SIZE, PROT_NONE) as m:
        m.protect(PAGE_SIZE, 2 * PAGE_SIZE, RW)
        m.write(PAGE_SIZE, b"a")
        m.write(3 * PAGE_SIZE - 1, b"z")
        m.protect(PAGE_SIZE, PAGE_SIZE, PROT_READ)
        assert m.read(PAGE_SIZE, 1) == b"a"
        # write to the read-only page: SIGSEGV in a child
        assert child(lambda: m.write(PAGE_SIZE, b"b")) == -signal.SIGSEGV
        assert m.read(PAGE_SIZE, 1) == b"a"


def test_touching_prot_none_kills_with_sigsegv(memfd: int, child: Child) -> None:
    with Mapping.map_shared(memfd, 2 * PAGE_SIZE, RW) as m:
        m.protect(PAGE_SIZE, PAGE_SIZE, PROT_NONE)
        v = m.view(0, 2 * PAGE_SIZE)
        assert child(lambda: v[0]) == 0  # accessible page: the child exits normally
        assert child(lambda: v[PAGE_SIZE]) == -signal.SIGSEGV
        assert child(lambda: v.__setitem__(PAGE_SIZE + 7, 1)) == -signal.SIGSEGV
        assert child(lambda: m.read(PAGE_SIZE, 1)) == -signal.SIGSEGV
        v.release()


def test_stale_view_after_close_faults_and_backing_is_unmapped(memfd: int, child: Child) -> None:
    dev, ino = _inode(memfd)
    m = Mapping.map_shared(memfd, 2 * PAGE_SIZE, RW)
    m.write(0, b"secret")
    stale = m.view(0, 2 * PAGE_SIZE)
    address = m.address
    m.close()
    # The backing is really gone from this process, yet the address stays reserved ...
    assert mapping_count_for_inode(os.getpid(), dev, ino) == 0
    assert _maps_line_at(address) is not None
    # ... so the stale view crashes rather than reading whatever is mapped there next.
    assert child(lambda: stale[0]) == -signal.SIGSEGV
    stale.release()
    gc.collect()
    assert _maps_line_at(address) is None  # reservation released with the last view


def _maps_line_at(address: int) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            start, _, end = line.split(maxsplit=1)[0].partition("-")
            if int(start, 16) <= address < int(end, 16):
                return line
    return None


def test_discard_on_shared_mapping_keeps_contents(memfd: int) -> None:
    dev, ino = _inode(memfd)
    with (
        Mapping.map_shared(memfd, 4 * PAGE_SIZE, RW) as a,
        Mapping.map_shared(memfd, 4 * PAGE_SIZE, PROT_READ) as b,
    ):
        assert mapping_count_for_inode(os.getpid(), dev, ino) == 2
        a.write(PAGE_SIZE, b"kept in the page cache")
        a.discard(0, 4 * PAGE_SIZE)
        # MADV_DONTNEED on MAP_SHARED only dropped a's PTEs: the data is still the file's.
        assert b.read(PAGE_SIZE, 22) == b"kept in the page cache"
        assert a.read(PAGE_SIZE, 22) == b"kept in the page cache"
        assert os.pread(memfd, 22, PAGE_SIZE) == b"kept in the page cache"


def test_guard_install_and_remove(memfd: int, child: Child) -> None:
    with Mapping.map_shared(memfd, 4 * PAGE_SIZE, RW) as m:
        m.write(2 * PAGE_SIZE, b"behind the guard")
        m.guard_install(2 * PAGE_SIZE, PAGE_SIZE)
        assert child(lambda: m.read(2 * PAGE_SIZE, 1)) == -signal.SIGSEGV
        assert child(lambda: m.write(2 * PAGE_SIZE, b"x")) == -signal.SIGSEGV
        assert child(lambda: m.read(PAGE_SIZE, 1)) == 0  # neighbours untouched
        m.guard_remove(2 * PAGE_SIZE, PAGE_SIZE)
        assert m.read(2 * PAGE_SIZE, 16) == b"behind the guard"


def test_guard_on_unsupported_mapping_is_kernel_feature_missing(
    huge_pages_2m: Callable[[int], None],
) -> None:
    # Guard regions need a page-table-backed mapping: a hugetlb one is refused with EINVAL.
    # A MAP_SHARED hugetlb mapping reserves its huge pages at mmap() time: one must be free.
    huge_pages_2m(1)
    try:
        fd = create_memfd("huge", 2 << 20, hugetlb_page_size=2 << 20)
    except OSError:
        pytest.skip("kernel has no 2 MiB hugetlbfs")
    try:
        m = Mapping.map_shared(fd, 2 << 20, PROT_NONE)
        with m, pytest.raises(KernelFeatureMissing) as exc:
            m.guard_install(0, 2 << 20)
        assert exc.value.errno == errno.EINVAL
        assert exc.value.feature == "MADV_GUARD_INSTALL"
    finally:
        os.close(fd)


def test_guard_pages_cost_no_vma_but_mprotect_does(child: Child) -> None:
    pages = 8192
    fd = create_memfd("fragmented", pages * PAGE_SIZE)
    st = os.fstat(fd)
    pid = os.getpid()

    def vmas() -> int:
        # Only this memfd's VMAs: other threads of the test process map and unmap meanwhile.
        return mapping_count_for_inode(pid, st.st_dev, st.st_ino)

    try:
        with Mapping.map_shared(fd, pages * PAGE_SIZE, RW) as m:
            assert vmas() == 1
            for i in range(0, pages, 2):
                m.guard_install(i * PAGE_SIZE, PAGE_SIZE)
            assert vmas() == 1
            assert child(lambda: m.read(4094 * PAGE_SIZE, 1)) == -signal.SIGSEGV
            assert child(lambda: m.read(4095 * PAGE_SIZE, 1)) == 0
            for i in range(0, pages, 2):
                m.guard_remove(i * PAGE_SIZE, PAGE_SIZE)
        with Mapping.map_shared(fd, pages * PAGE_SIZE, RW) as m:
            for i in range(0, pages, 2):
                m.protect(i * PAGE_SIZE, PAGE_SIZE, PROT_NONE)
            assert vmas() == pages
        assert vma_count(pid) > 0
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (-PAGE_SIZE, PAGE_SIZE),
        (0, 5 * PAGE_SIZE),
        (4 * PAGE_SIZE, PAGE_SIZE),
        (1, PAGE_SIZE),
        (0, PAGE_SIZE + 1),
        (0, 0),
        (0, -PAGE_SIZE),
    ],
    ids=["negative", "too-long", "past-end", "unaligned-off", "unaligned-len", "empty", "neg-len"],
)
def test_page_operations_reject_bad_ranges(memfd: int, offset: int, length: int) -> None:
    with Mapping.map_shared(memfd, 4 * PAGE_SIZE, RW) as m:
        ops: list[Callable[[], None]] = [
            lambda: m.protect(offset, length, PROT_READ),
            lambda: m.discard(offset, length),
            lambda: m.guard_install(offset, length),
            lambda: m.guard_remove(offset, length),
        ]
        for op in ops:
            with pytest.raises(ValueError):
                op()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, 4 * PAGE_SIZE + 1), (4 * PAGE_SIZE, 1), (0, -1)],
    ids=["negative", "too-long", "past-end", "neg-len"],
)
def test_byte_operations_reject_out_of_bounds(memfd: int, offset: int, length: int) -> None:
    with Mapping.map_shared(memfd, 4 * PAGE_SIZE, RW) as m:
        with pytest.raises(ValueError):
            m.read(offset, length)
        with pytest.raises(ValueError):
            m.view(offset, length)
        if length >= 0:
            with pytest.raises(ValueError):
                m.write(offset, b"x" * length)
        # unaligned byte ranges inside the mapping are fine
        assert m.read(4 * PAGE_SIZE - 3, 3) == b"\0\0\0"
        assert m.view(4 * PAGE_SIZE, 0).nbytes == 0


@pytest.mark.parametrize(
    ("length", "offset", "prot"),
    [
        (0, 0, PROT_NONE),
        (PAGE_SIZE + 1, 0, PROT_NONE),
        (PAGE_SIZE, 1, PROT_NONE),
        (PAGE_SIZE, 0, 4),
    ],
    ids=["zero-length", "unaligned-length", "unaligned-offset", "prot-exec"],
)
def test_map_shared_rejects_bad_arguments(memfd: int, length: int, offset: int, prot: int) -> None:
    with pytest.raises(ValueError):
        Mapping.map_shared(memfd, length, prot, offset)


def test_map_shared_kernel_errors() -> None:
    fd = create_memfd("errs", PAGE_SIZE, sealed=False)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe()
    try:
        cases = [
            (-1, RW, errno.EBADF),
            (r, PROT_READ, errno.ENODEV),  # a pipe cannot be mapped
            (ro, RW, errno.EACCES),  # shared + writable needs O_RDWR
        ]
        for fd_, prot, err in cases:
            with pytest.raises(OSError) as exc:
                Mapping.map_shared(fd_, PAGE_SIZE, prot)
            assert exc.value.errno == err, (fd_, prot, exc.value)
        with Mapping.map_shared(ro, PAGE_SIZE, PROT_READ) as m, pytest.raises(OSError) as exc:
            m.protect(0, PAGE_SIZE, RW)  # mapping of a read-only fd cannot become writable
        assert exc.value.errno == errno.EACCES
        add_seals(fd, F_SEAL_WRITE)
        with pytest.raises(PermissionError):
            Mapping.map_shared(fd, PAGE_SIZE, RW)  # sealed against writes
    finally:
        for x in (ro, fd, r, w):
            os.close(x)


def test_mapping_count_for_inode_counts_vmas(memfd: int) -> None:
    dev, ino = _inode(memfd)
    pid = os.getpid()
    with Mapping.map_shared(memfd, 4 * PAGE_SIZE, RW) as m:
        assert mapping_count_for_inode(pid, dev, ino) == 1
        m.protect(PAGE_SIZE, PAGE_SIZE, PROT_NONE)  # splits into three VMAs
        assert mapping_count_for_inode(pid, dev, ino) == 3
        assert mapping_count_for_inode(pid, dev, ino + 1) == 0
    assert mapping_count_for_inode(pid, dev, ino) == 0
