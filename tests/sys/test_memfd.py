"""memfd creation, sealing and fd identification against the real kernel."""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Callable

import pytest

from membroker._sys import (
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE_SIZE,
    GuestMemfdFactory,
    add_seals,
    create_memfd,
    describe_fd,
    get_seals,
    hugetlb_free_pages,
    open_fd_count,
)
from membroker._sys.memfd import MFD_HUGE_2MB, MFD_HUGETLB

HUGE_2M = 2 << 20
Child = Callable[[Callable[[], object]], int]


def _has_hugetlbfs() -> bool:
    try:
        fd = os.memfd_create("probe", os.MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB)
    except OSError:
        return False
    os.close(fd)
    return True


def test_create_sealed_memfd() -> None:
    fd = create_memfd("space-1", 4 * PAGE_SIZE)
    try:
        assert os.fstat(fd).st_size == 4 * PAGE_SIZE
        assert get_seals(fd) == F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
        assert os.get_inheritable(fd) is False
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:space-1 (deleted)"
    finally:
        os.close(fd)


@pytest.mark.parametrize("new_size", [0, PAGE_SIZE, 8 * PAGE_SIZE], ids=["zero", "shrink", "grow"])
def test_sealed_memfd_refuses_ftruncate(new_size: int) -> None:
    fd = create_memfd("sealed", 4 * PAGE_SIZE)
    try:
        with pytest.raises(PermissionError) as exc:
            os.ftruncate(fd, new_size)
        assert exc.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == 4 * PAGE_SIZE
    finally:
        os.close(fd)


def test_sealed_memfd_refuses_grow_by_write_and_more_seals() -> None:
    fd = create_memfd("sealed", PAGE_SIZE)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", PAGE_SIZE)
        assert os.pwrite(fd, b"inside", 0) == 6
        with pytest.raises(PermissionError):
            add_seals(fd, F_SEAL_WRITE)
    finally:
        os.close(fd)


def test_unsealed_memfd_can_be_sealed_later() -> None:
    fd = create_memfd("open", PAGE_SIZE, sealed=False)
    try:
        assert get_seals(fd) == 0
        os.ftruncate(fd, 2 * PAGE_SIZE)
        add_seals(fd, F_SEAL_WRITE)
        assert get_seals(fd) == F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("name", "size", "huge", "err"),
    [
        ("m", 0, None, errno.EINVAL),
        ("m", -PAGE_SIZE, None, errno.EINVAL),
        ("m", PAGE_SIZE + 1, None, errno.EINVAL),
        ("x" * 250, PAGE_SIZE, None, errno.EINVAL),  # MFD_NAME_MAX_LEN is 249
        ("m", 1 << 40, 1 << 40, errno.ENODEV),  # 1 TiB pages: no such hugetlb pool
        ("m", 6 << 20, 3 << 20, errno.EINVAL),  # not a power of two
        ("m", PAGE_SIZE, PAGE_SIZE, errno.EINVAL),  # not above PAGE_SIZE
        ("m", PAGE_SIZE, HUGE_2M, errno.EINVAL),  # size not a multiple of the huge page
    ],
    ids=[
        "size-zero",
        "size-negative",
        "size-unaligned",
        "name-too-long",
        "hugetlb-absurd-size",
        "hugetlb-not-power-of-two",
        "hugetlb-too-small",
        "hugetlb-unaligned-size",
    ],
)
def test_create_memfd_invalid_inputs(name: str, size: int, huge: int | None, err: int) -> None:
    with pytest.raises(OSError) as exc:
        create_memfd(name, size, hugetlb_page_size=huge)
    assert exc.value.errno == err, exc.value
    # the autouse no_fd_leak fixture checks nothing stayed open on the error path


def test_create_memfd_closes_its_fd_when_ftruncate_fails(child: Child) -> None:
    def body() -> None:
        # RLIMIT_FSIZE makes ftruncate fail with EFBIG after memfd_create succeeded (Python
        # ignores the SIGXFSZ that comes with it); the new fd must be closed before raising.
        resource.setrlimit(resource.RLIMIT_FSIZE, (PAGE_SIZE, PAGE_SIZE))
        before = open_fd_count(os.getpid())
        try:
            create_memfd("too-big", 2 * PAGE_SIZE)
        except OSError as e:
            assert e.errno == errno.EFBIG, e
        else:
            raise AssertionError("ftruncate beyond RLIMIT_FSIZE succeeded")
        assert open_fd_count(os.getpid()) == before

    assert child(body) == 0


def test_describe_memfd() -> None:
    fd = create_memfd("described", 3 * PAGE_SIZE)
    try:
        info = describe_fd(fd)
        st = os.fstat(fd)
        assert info.kind == "memfd"
        assert info.size == 3 * PAGE_SIZE
        assert (info.dev, info.ino) == (st.st_dev, st.st_ino)
        assert info.writable is True
        assert info.seals == F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
        assert info.path == "/memfd:described (deleted)"
        assert info.page_size == PAGE_SIZE
    finally:
        os.close(fd)


def test_describe_memfd_read_only_reopen() -> None:
    fd = create_memfd("ro", PAGE_SIZE)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = describe_fd(ro)
        assert info.kind == "memfd"
        assert info.writable is False
        assert info.ino == os.fstat(fd).st_ino
    finally:
        os.close(ro)
        os.close(fd)


def test_describe_hugetlb_memfd() -> None:
    if not _has_hugetlbfs():
        pytest.skip("kernel has no 2 MiB hugetlbfs")
    # No huge pages need to be free: memfd_create and ftruncate reserve nothing.
    fd = create_memfd("huge", HUGE_2M, hugetlb_page_size=HUGE_2M)
    try:
        info = describe_fd(fd)
        assert info.kind == "memfd-hugetlb"
        assert info.path == "/memfd:huge (deleted)"
        assert info.size == HUGE_2M
        assert info.page_size == HUGE_2M
        assert info.seals == F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
    finally:
        os.close(fd)
    assert hugetlb_free_pages(HUGE_2M) >= 0
    assert hugetlb_free_pages(3 << 20) == 0


def test_describe_guest_memfd(gmem_factory: GuestMemfdFactory) -> None:
    fd = gmem_factory.create(2 * PAGE_SIZE)
    try:
        info = describe_fd(fd)
        assert info.kind == "guest_memfd"
        assert info.path == "anon_inode:[kvm-gmem]"
        assert info.size == 2 * PAGE_SIZE
        assert info.writable is True
        assert info.seals is None
        assert info.ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_describe_pipe() -> None:
    r, w = os.pipe()
    try:
        info = describe_fd(r)
        assert info.kind == "other"
        assert info.path.startswith("pipe:[")
        assert info.writable is False
        assert info.seals is None
        assert describe_fd(w).writable is False  # O_WRONLY is not O_RDWR
    finally:
        os.close(r)
        os.close(w)


def test_describe_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        info = describe_fd(a.fileno())
        assert info.kind == "other"
        assert info.path.startswith("socket:[")
        assert info.writable is True


def test_describe_regular_file_read_only() -> None:
    fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = describe_fd(fd)
        assert info.kind == "other"
        assert info.path == os.path.realpath(__file__)
        assert info.size == os.path.getsize(__file__)
        assert info.writable is False
    finally:
        os.close(fd)


def test_describe_memfd_with_path_like_name() -> None:
    # The link text embeds the caller's name verbatim; the kind must not depend on it.
    fd = create_memfd("../etc/passwd", PAGE_SIZE)
    try:
        info = describe_fd(fd)
        assert info.kind == "memfd"
        assert info.path == "/memfd:../etc/passwd (deleted)"
    finally:
        os.close(fd)
