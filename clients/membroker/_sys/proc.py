"""The kernel's view of other processes from /proc: fd tables (leak checks) and mappings
(verifying what a client still maps after a revoke, audits)."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import struct
from typing import Final

from .kvm import _IOWR
from .libc import PAGE_SIZE, KernelFeatureMissing

__all__ = ["ProcessView", "Vma", "fd_targets", "open_fd_count", "process_groups"]


def _fd_numbers(pid: int) -> list[int]:
    """The open fd numbers of `pid`, without the directory fd this function itself opens."""
    dir_fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = os.listdir(dir_fd)
    finally:
        os.close(dir_fd)
    fds = sorted(int(name) for name in names)
    if pid == os.getpid():
        # Listing our own fd table shows the directory fd we held while listing it.
        fds.remove(dir_fd)
    return fds


def open_fd_count(pid: int) -> int:
    """How many fds process `pid` has open right now."""
    return len(_fd_numbers(pid))


def fd_targets(pid: int) -> list[str]:
    """readlink of each open fd of `pid`, by fd number ("pipe:[123]", "/memfd:x (deleted)", ...).

    Fds closed while we look are skipped.
    """
    targets = []
    for fd in _fd_numbers(pid):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return targets


def process_groups(pid: int) -> frozenset[int]:
    """The real gid and supplementary groups of `pid` (from /proc/PID/status)."""
    groups: set[int] = set()
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Gid:"):
                groups.add(int(line.split()[1]))
            elif line.startswith(b"Groups:"):
                groups.update(int(g) for g in line.split()[1:])
    return frozenset(groups)


class ProcmapQuery(ctypes.Structure):
    """struct procmap_query (include/uapi/linux/fs.h), the argument of PROCMAP_QUERY.

    Byte layout (104 bytes)::

        0  u64 size          in     48 u64 vma_offset    out    80 u32 vma_name_size  in/out
        8  u64 query_flags   in     56 u64 inode         out    84 u32 build_id_size  in/out
        16 u64 query_addr    in     64 u32 dev_major     out    88 u64 vma_name_addr  in
        24 u64 vma_start     out    68 u32 dev_minor     out    96 u64 build_id_addr  in
        32 u64 vma_end       out
        40 u64 vma_flags     out (PROCMAP_QUERY_VMA_*)       (72..80: vma_page_size, out)
    """

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("query_flags", ctypes.c_uint64),
        ("query_addr", ctypes.c_uint64),
        ("vma_start", ctypes.c_uint64),
        ("vma_end", ctypes.c_uint64),
        ("vma_flags", ctypes.c_uint64),
        ("vma_page_size", ctypes.c_uint64),
        ("vma_offset", ctypes.c_uint64),
        ("inode", ctypes.c_uint64),
        ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32),
        ("vma_name_size", ctypes.c_uint32),
        ("build_id_size", ctypes.c_uint32),
        ("vma_name_addr", ctypes.c_uint64),
        ("build_id_addr", ctypes.c_uint64),
    ]


assert ctypes.sizeof(ProcmapQuery) == 104

PROCMAP_QUERY: Final = _IOWR(ord("f"), 17, ProcmapQuery)
PROCMAP_QUERY_VMA_READABLE: Final = 0x01
PROCMAP_QUERY_VMA_WRITABLE: Final = 0x02
PROCMAP_QUERY_VMA_EXECUTABLE: Final = 0x04
PROCMAP_QUERY_VMA_SHARED: Final = 0x08
PROCMAP_QUERY_COVERING_OR_NEXT_VMA: Final = 0x10
PROCMAP_QUERY_FILE_BACKED_VMA: Final = 0x20
# /proc/PID/pagemap: one u64 per virtual page; bit 63 present, bit 62 swapped, bit 58 guard
# marker (MADV_GUARD_INSTALL; since 6.15). Gotcha: a guard marker is a special swap-type entry,
# so it shows bit 62 as well: "swapped" only counts without bit 58.
_PAGEMAP_PRESENT: Final = 1 << 63
_PAGEMAP_SWAPPED: Final = 1 << 62
_PAGEMAP_GUARD: Final = 1 << 58
_PAGEMAP_ENTRY = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True, slots=True)
class Vma:
    """One mapping of a process, as the kernel reports it."""

    start: int
    end: int
    offset: int
    dev: int
    inode: int
    readable: bool
    writable: bool
    shared: bool

    @property
    def file_end(self) -> int:
        """The file offset just past this mapping."""
        return self.offset + self.end - self.start

    @property
    def perms(self) -> str:
        return (
            ("r" if self.readable else "-")
            + ("w" if self.writable else "-")
            + ("s" if self.shared else "p")
        )


class ProcessView:
    """The kernel's view of one process's memory: /proc/PID/maps (PROCMAP_QUERY) and pagemap.

    Opened once, when a session is accepted: the open files stay bound to that process even if
    its pid is later reused, and reads fail (ESRCH / empty) once it is gone.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._maps = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._maps)
            raise
        self._query = ProcmapQuery()

    def _ask(self, addr: int, flags: int) -> Vma | None:
        q = self._query
        ctypes.memset(ctypes.addressof(q), 0, ctypes.sizeof(q))
        q.size = ctypes.sizeof(q)
        q.query_flags = flags
        q.query_addr = addr
        try:
            # SAFETY: q is a live 104-byte procmap_query owned by this object; name and
            # build-id buffers are zero-sized, so the kernel writes nothing but q itself.
            fcntl.ioctl(self._maps, PROCMAP_QUERY, q)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            if exc.errno == errno.ENOTTY:
                raise KernelFeatureMissing("PROCMAP_QUERY", "the kernel predates 6.11") from exc
            raise
        return Vma(
            q.vma_start,
            q.vma_end,
            q.vma_offset,
            os.makedev(q.dev_major, q.dev_minor),
            q.inode,
            bool(q.vma_flags & PROCMAP_QUERY_VMA_READABLE),
            bool(q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE),
            bool(q.vma_flags & PROCMAP_QUERY_VMA_SHARED),
        )

    def vma_at(self, addr: int) -> Vma | None:
        """The mapping covering `addr`, or None."""
        return self._ask(addr, 0)

    def mappings_of(self, dev: int, inode: int) -> list[Vma]:
        """Every mapping of the file (dev, inode), from one read of the maps text.

        Reading the whole text (~0.4 ms for a Python process) beats walking it with
        PROCMAP_QUERY (~8 us per VMA, ~170 file-backed VMAs): targeted questions use
        `vma_at`, full scans use this. The kernel builds the text under the mmap lock a page
        at a time, so a process changing its mappings meanwhile can show a VMA twice or not
        at all: callers only trust a scan of a process that is not expected to be changing.
        """
        chunks = []
        offset = 0
        while chunk := os.pread(self._maps, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        wanted = b" %d " % inode
        out = []
        for line in b"".join(chunks).split(b"\n"):
            if wanted not in line:
                continue
            # "start-end perms offset MAJOR:MINOR inode [path]", numbers in hex but the inode.
            fields = line.split(None, 5)
            if len(fields) < 5 or int(fields[4]) != inode:
                continue
            major, minor = fields[3].split(b":")
            if os.makedev(int(major, 16), int(minor, 16)) != dev:
                continue
            start, end = fields[0].split(b"-")
            perms = fields[1]
            out.append(
                Vma(
                    int(start, 16),
                    int(end, 16),
                    int(fields[2], 16),
                    dev,
                    inode,
                    perms[0:1] == b"r",
                    perms[1:2] == b"w",
                    perms[3:4] == b"s",
                )
            )
        return out

    def _entries(self, addr: int, pages: int) -> list[int]:
        data = os.pread(self._pagemap, pages * 8, (addr // PAGE_SIZE) * 8)
        return [entry for (entry,) in _PAGEMAP_ENTRY.iter_unpack(data)]

    def first_present(self, addr: int, pages: int) -> int | None:
        """Index of the first of `pages` pages from `addr` still mapped (present or swapped)."""
        for index, entry in enumerate(self._entries(addr, pages)):
            if entry & _PAGEMAP_PRESENT or (
                entry & _PAGEMAP_SWAPPED and not entry & _PAGEMAP_GUARD
            ):
                return index
        return None

    def first_unguarded(self, addr: int, pages: int) -> int | None:
        """Index of the first of `pages` pages from `addr` without a guard marker."""
        for index, entry in enumerate(self._entries(addr, pages)):
            if not entry & _PAGEMAP_GUARD:
                return index
        return None

    def close(self) -> None:
        for fd in (self._maps, self._pagemap):
            if fd >= 0:
                os.close(fd)
        self._maps = self._pagemap = -1
