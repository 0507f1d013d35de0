"""memfd backings for spaces (create, seal) and identification of any fd a peer hands us."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Final, Literal

from .libc import PAGE_SIZE, check, libc

__all__ = [
    "F_ADD_SEALS",
    "F_GET_SEALS",
    "F_SEAL_FUTURE_WRITE",
    "F_SEAL_GROW",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "HUGETLBFS_MAGIC",
    "MFD_ALLOW_SEALING",
    "MFD_CLOEXEC",
    "MFD_HUGETLB",
    "MFD_HUGE_1GB",
    "MFD_HUGE_2MB",
    "MFD_HUGE_MASK",
    "MFD_HUGE_SHIFT",
    "TMPFS_MAGIC",
    "FdInfo",
    "FdKind",
    "add_seals",
    "create_memfd",
    "describe_fd",
    "get_seals",
    "hugetlb_free_pages",
]

# include/uapi/linux/fcntl.h
F_ADD_SEALS: Final = 1033
F_GET_SEALS: Final = 1034
F_SEAL_SEAL: Final = 0x0001
F_SEAL_SHRINK: Final = 0x0002
F_SEAL_GROW: Final = 0x0004
F_SEAL_WRITE: Final = 0x0008
F_SEAL_FUTURE_WRITE: Final = 0x0010

# include/uapi/linux/memfd.h (+ asm-generic/hugetlb_encode.h for the size field)
MFD_CLOEXEC: Final = 0x0001
MFD_ALLOW_SEALING: Final = 0x0002
MFD_HUGETLB: Final = 0x0004
MFD_HUGE_SHIFT: Final = 26
MFD_HUGE_MASK: Final = 0x3F
MFD_HUGE_2MB: Final = 21 << MFD_HUGE_SHIFT
MFD_HUGE_1GB: Final = 30 << MFD_HUGE_SHIFT

# include/uapi/linux/magic.h
TMPFS_MAGIC: Final = 0x01021994
HUGETLBFS_MAGIC: Final = 0x958458F6

# The seals every memfd backing carries: nobody holding the fd can shrink it under the guest
# (which would SIGBUS every mapping past the new end) or grow it, and nobody can change the seals.
_BACKING_SEALS: Final = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL

# What readlink(/proc/self/fd/N) shows, verified on Linux 6.18: a memfd (hugetlb or not) is
# "/memfd:NAME (deleted)"; a guest_memfd is an anonymous inode of its own, "anon_inode:[kvm-gmem]".
_MEMFD_LINK_PREFIX: Final = "/memfd:"
_GUEST_MEMFD_LINK: Final = "anon_inode:[kvm-gmem]"

FdKind = Literal["memfd", "memfd-hugetlb", "guest_memfd", "other"]


class StatFs(ctypes.Structure):
    """glibc/musl `struct statfs` on 64-bit Linux (120 bytes).

    offset  size  field
         0     8  f_type      filesystem magic (TMPFS_MAGIC, HUGETLBFS_MAGIC, ...)
         8     8  f_bsize     block size; the huge page size on hugetlbfs
        16    40  f_blocks, f_bfree, f_bavail, f_files, f_ffree
        56     8  f_fsid
        64    24  f_namelen, f_frsize, f_flags
        88    32  f_spare[4]
    """

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


assert ctypes.sizeof(StatFs) == 120


@dataclass(frozen=True)
class FdInfo:
    """What an fd is, from the kernel's point of view (readlink, fstat, fstatfs, fcntl).

    `page_size` is the granule mappings and holes of this backing must be aligned to: the huge
    page size for a hugetlb memfd, PAGE_SIZE otherwise.
    """

    kind: FdKind
    size: int
    dev: int
    ino: int
    writable: bool
    seals: int | None
    path: str
    page_size: int = PAGE_SIZE


def _fstatfs(fd: int) -> StatFs:
    buf = StatFs()
    # SAFETY: `buf` is a live StatFs of exactly sizeof(struct statfs) bytes owned by this frame;
    # fd is only read by the kernel (EBADF if it is not open).
    check(libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return buf


def _huge_flag(page_size: int) -> int:
    """The MFD_HUGE_* size field for `page_size`, which must be a power of two above PAGE_SIZE."""
    if page_size <= PAGE_SIZE or page_size & (page_size - 1):
        raise OSError(
            errno.EINVAL,
            f"memfd_create: hugetlb page size {page_size} is not a power of two above {PAGE_SIZE}",
        )
    shift = page_size.bit_length() - 1
    if shift > MFD_HUGE_MASK:
        raise OSError(errno.EINVAL, f"memfd_create: hugetlb page size 2**{shift} cannot be encoded")
    return MFD_HUGETLB | (shift << MFD_HUGE_SHIFT)


def create_memfd(
    name: str,
    size: int,
    *,
    hugetlb_page_size: int | None = None,
    sealed: bool = True,
) -> int:
    """Create a memfd of `size` bytes and return the fd, owned by the caller, close-on-exec.

    `sealed` adds F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL. Every invalid input is an OSError with
    the errno the kernel uses for it: EINVAL for a size that is not a positive multiple of the
    (huge) page size, an unencodable hugetlb page size or a name over 249 bytes; ENODEV when the
    kernel has no hugetlb pool of that page size. The kernel itself would accept a memfd of size
    0 or of a ragged size; we refuse them with EINVAL like KVM_CREATE_GUEST_MEMFD does, so both
    kinds of backing reject the same sizes.
    """
    granule = hugetlb_page_size if hugetlb_page_size is not None else PAGE_SIZE
    flags = MFD_CLOEXEC | MFD_ALLOW_SEALING
    if hugetlb_page_size is not None:
        flags |= _huge_flag(hugetlb_page_size)
    if size <= 0 or size % granule:
        raise OSError(
            errno.EINVAL, f"create_memfd: size {size} is not a positive multiple of {granule}"
        )
    fd = os.memfd_create(name, flags)
    try:
        # Gotcha: hugetlbfs refuses a size that is not a multiple of the huge page size (EINVAL)
        # but does NOT reserve pages here; with no free huge pages the mmap() fails (ENOMEM)
        # and a fault past the reservation is SIGBUS. Check hugetlb_free_pages() beforehand.
        os.ftruncate(fd, size)
        if sealed:
            # The seals go on only after ftruncate: F_SEAL_GROW would forbid setting the size.
            add_seals(fd, _BACKING_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def get_seals(fd: int) -> int:
    """The seals of a memfd (F_GET_SEALS). EINVAL for an fd that cannot carry seals."""
    return fcntl.fcntl(fd, F_GET_SEALS)


def add_seals(fd: int, seals: int) -> None:
    """Add `seals` (F_ADD_SEALS). EPERM once F_SEAL_SEAL is set, or for F_SEAL_WRITE while a
    writable shared mapping exists (EBUSY); EINVAL for an fd that cannot carry seals."""
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


def hugetlb_free_pages(page_size: int) -> int:
    """Huge pages of `page_size` a new mapping can still have: the pool's free pages less
    those already reserved for mappings made earlier (a free page may be promised to one);
    0 if the kernel has no such pool."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB"
    try:
        with open(f"{base}/free_hugepages") as f:
            free = int(f.read())
        with open(f"{base}/resv_hugepages") as f:
            reserved = int(f.read())
    except FileNotFoundError:
        return 0
    return max(0, free - reserved)


def describe_fd(fd: int) -> FdInfo:
    """Identify `fd` (borrowed): memfd, hugetlb memfd, guest_memfd or anything else."""
    path = os.readlink(f"/proc/self/fd/{fd}")
    st = os.fstat(fd)
    writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) == os.O_RDWR
    kind: FdKind = "other"
    page_size = PAGE_SIZE
    if path == _GUEST_MEMFD_LINK:
        kind = "guest_memfd"
    elif path.startswith(_MEMFD_LINK_PREFIX) and stat.S_ISREG(st.st_mode):
        # A hugetlb memfd has the same link text; only the filesystem behind it tells them apart.
        fs = _fstatfs(fd)
        magic = fs.f_type & 0xFFFFFFFF
        if magic == HUGETLBFS_MAGIC:
            kind = "memfd-hugetlb"
            page_size = fs.f_bsize
        elif magic == TMPFS_MAGIC:
            kind = "memfd"
    seals: int | None
    try:
        seals = get_seals(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        seals = None
    return FdInfo(
        kind=kind,
        size=st.st_size,
        dev=st.st_dev,
        ino=st.st_ino,
        writable=writable,
        seals=seals,
        path=path,
        page_size=page_size,
    )
