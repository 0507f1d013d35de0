"""The kernel's view of other processes from /proc: fd tables (leak checks) and mappings
(verifying what a client still maps after a revoke, audits)."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from typing import Final

from .kvm import _IOWR
from .libc import PAGE_SIZE, KernelFeatureMissing

__all__ = [
    "ProcessView",
    "TooManyMappings",
    "Vma",
    "fd_targets",
    "open_fd_count",
    "process_groups",
]


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
# A walk over every mapping of a process: what the caller fills in (size, query_flags,
# query_addr at offset 0) and what the kernel answers (vma_start .. dev_minor at offset 24).
# Not filtered to file-backed ones in the kernel: it would step over anonymous mappings
# inside one ioctl, uncounted, so a process could make a short walk arbitrarily long.
_WALK_FLAGS: Final = PROCMAP_QUERY_COVERING_OR_NEXT_VMA
_QUERY_IN: Final = struct.Struct("=QQQ")
_QUERY_OUT: Final = struct.Struct("=QQQQQQII")
_QUERY_OUT_AT: Final = 24
# The walk's hot path: the one input that changes (query_addr, at offset 16: the kernel writes
# the struct back with its inputs as they were), and the answer's start, end and inode (the
# rest is unpacked only for a mapping of the file asked about).
_QUERY_ADDR: Final = struct.Struct("=Q")
_QUERY_ADDR_AT: Final = 16
_QUERY_SPAN_INODE: Final = struct.Struct("=QQ24xQ")
assert ProcmapQuery.query_addr.offset == _QUERY_ADDR_AT
assert ProcmapQuery.vma_start.offset == _QUERY_OUT_AT
assert ProcmapQuery.inode.offset == _QUERY_OUT_AT + _QUERY_SPAN_INODE.size - 8
# The walk's buffer: longer than the 1024 bytes CPython's fcntl.ioctl would copy (see _walk).
_WALK_BUFFER: Final = 1025
# /proc/PID/pagemap: one u64 per virtual page; bit 63 present, bit 62 swapped, bit 58 guard
# marker (MADV_GUARD_INSTALL; since 6.15). Gotcha: a guard marker is a special swap-type entry,
# so it shows bit 62 as well: "swapped" only counts without bit 58.
_PAGEMAP_PRESENT: Final = 1 << 63
_PAGEMAP_SWAPPED: Final = 1 << 62
_PAGEMAP_GUARD: Final = 1 << 58
_PAGEMAP_UFFD_WP: Final = 1 << 57
_PAGEMAP_ENTRY = struct.Struct("<Q")


class PmScanArg(ctypes.Structure):
    """struct pm_scan_arg (include/uapi/linux/fs.h), the argument of PAGEMAP_SCAN (6.7+).

    Twelve u64s (96 bytes): size, flags, start, end (in: the address range), walk_end (out:
    where the walk stopped), vec, vec_len (in: a page_region array), max_pages, and the
    category masks: a page matches when ((categories ^ inverted) & mask) == mask and, if
    anyof is set, ((categories ^ inverted) & anyof) != 0.
    """

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


class PageRegion(ctypes.Structure):
    """struct page_region: [start, end) addresses of consecutive matching pages (24 bytes)."""

    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PmScanArg) == 96
assert ctypes.sizeof(PageRegion) == 24

PAGEMAP_SCAN: Final = _IOWR(ord("f"), 16, PmScanArg)
# "Written": present or swapped without the uffd-wp bit, i.e. writable without a fault the
# broker sees (for a page write-protected through userfaultfd the bit is clear).
PAGE_IS_WRITTEN: Final = 1 << 1
PAGE_IS_PRESENT: Final = 1 << 3
PAGE_IS_SWAPPED: Final = 1 << 4
# Since 6.14 a guard marker is its own category (it is also reported as swapped).
PAGE_IS_GUARD: Final = 1 << 8
_SCAN_REGIONS = 1024
_SCAN_FIRST_REGIONS = 16


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


class TooManyMappings(Exception):
    """A walk of a process's mappings stopped at its limit: the process has more mappings
    than the caller would look at on its thread (`ProcessView.walk_mappings_of`)."""

    def __init__(self, pid: int, limit: int) -> None:
        super().__init__(f"process {pid} has more than {limit} mappings")
        self.pid = pid
        self.limit = limit


def _voluntary_switches() -> int:
    """How often the calling thread has slept so far (waiting for a lock, for I/O): one
    getrusage, ~0.5 us."""
    # Imported here, not with the module: SDK clients import this module, and each shared
    # object a process loads is five more mappings for every verification to walk.
    import resource

    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class ProcessView:
    """The kernel's view of one process's memory: /proc/PID/maps (PROCMAP_QUERY) and pagemap.

    Opened once, when a session is accepted, with a pidfd: the open files stay bound to that
    process even if its pid is later reused, and reads fail (ESRCH / empty) once it is gone.

    An execve gives the process a new memory image, and files opened on the old one read as
    empty (maps, pagemap) or fail with ESRCH (PROCMAP_QUERY, PAGEMAP_SCAN): left alone, the view
    would see nothing mapped in a process that maps whatever it likes. So a read that comes back
    empty or with ESRCH is retried once on files opened again by pid, when the pidfd says the
    very process still lives (a live process keeps its pid, so the new files are its own);
    after `MAX_RENEWALS` such renewals the view raises OSError instead (a process cannot make
    the broker open files without end). `renewals` counts them.

    Safe to ask from several threads (an audit off the event loop while an acknowledgement is
    judged on it): every call uses its own buffers and positioned reads, and a renewal swaps the
    files in one assignment, closing the old ones only with the view.
    """

    MAX_RENEWALS: Final = 16
    SLOW_WALK_S: Final = 0.002
    # After a slow walk the process is not walked for this long, doubled with each slow walk
    # of it, up to SLOW_WALK_PAUSE_MAX_S.
    SLOW_WALK_PAUSE_S: Final = 1.0
    SLOW_WALK_PAUSE_MAX_S: Final = 600.0

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.renewals = 0
        # How many mappings the last whole look saw (-1: none yet): what the next may cost,
        # for a caller deciding whether it may block its thread for it (about 1 us each).
        self.last_mappings = -1
        # Walks that took longer than SLOW_WALK_S and slept (PROCMAP_QUERY waits for the
        # process's mmap lock, which it may hold for milliseconds): see `quick_to_walk`.
        self.slow_walks = 0
        self._walk_again_at = 0.0  # time.monotonic(): no walk before then (see quick_to_walk)
        self._files: tuple[int, int, int] = (-1, -1, -1)  # maps, pagemap, fd directory
        self._retired: list[int] = []
        self._lock = threading.Lock()
        self._pidfd = os.pidfd_open(pid)
        try:
            self._files = self._open_files()
        except OSError:
            self.close()
            raise
        self._has_scan = True

    def _open_files(self) -> tuple[int, int, int]:
        opened: list[int] = []
        try:
            for name, flags in (("maps", 0), ("pagemap", 0), ("fd", os.O_DIRECTORY)):
                opened.append(
                    os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC | flags)
                )
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        return opened[0], opened[1], opened[2]

    def _alive(self) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def _renew(self, seen: tuple[int, int, int]) -> bool:
        """After a read on `seen` came back empty or ESRCH: open the files again if the process
        still lives (True: ask again), else False (it is gone: the answer stands). Raises
        OSError past MAX_RENEWALS."""
        with self._lock:
            if self._files is not seen:
                return True  # another thread renewed them meanwhile
            if not self._alive():
                return False
            if self.renewals >= self.MAX_RENEWALS:
                raise OSError(
                    errno.EAGAIN,
                    f"process {self.pid} replaced its memory image more than "
                    f"{self.MAX_RENEWALS} times; its mappings are no longer followed",
                )
            try:
                files = self._open_files()
            except OSError:
                if not self._alive():
                    return False
                raise
            if not self._alive():  # it exited while we opened: the pid may be another's now
                for fd in files:
                    os.close(fd)
                return False
            self.renewals += 1
            self._retired += seen
            self._files = files
            return True

    @property
    def _maps(self) -> int:
        return self._files[0]

    @property
    def _pagemap(self) -> int:
        return self._files[1]

    @property
    def _fd_dir(self) -> int:
        return self._files[2]

    def _ask(self, addr: int, flags: int) -> Vma | None:
        q = ProcmapQuery()  # per call: a view may be asked from two threads at once
        ctypes.memset(ctypes.addressof(q), 0, ctypes.sizeof(q))
        q.size = ctypes.sizeof(q)
        q.query_flags = flags
        q.query_addr = addr
        for attempt in (0, 1):
            files = self._files
            try:
                # SAFETY: q is a live 104-byte procmap_query owned by this call; name and
                # build-id buffers are zero-sized, so the kernel writes nothing but q itself.
                fcntl.ioctl(files[0], PROCMAP_QUERY, q)
                break
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                if exc.errno == errno.ENOTTY:
                    raise KernelFeatureMissing("PROCMAP_QUERY", "the kernel predates 6.11") from exc
                if exc.errno != errno.ESRCH or attempt or not self._renew(files):
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

    def file_mappings_in(self, start: int, end: int) -> list[Vma]:
        """The file-backed mappings that intersect addresses [start, end), lowest first, by
        PROCMAP_QUERY: one ioctl per mapping found there, plus one, whatever else the process
        maps (a full maps read costs a line and a path per mapping: ~1.2 ms for a DPDK process
        with a thousand shared-library mappings). It sees only that range: a check that must
        see every mapping of a file anywhere in the process uses `mappings_of`. Raises
        KernelFeatureMissing before 6.11, OSError when the process is gone."""
        out: list[Vma] = []
        addr = start
        flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA | PROCMAP_QUERY_FILE_BACKED_VMA
        while addr < end:
            vma = self._ask(addr, flags)
            if vma is None or vma.start >= end:
                break
            out.append(vma)
            addr = vma.end
        return out

    def quick_to_walk(self, limit: int) -> bool:
        """Whether a walk of this process is known to be short: its last look saw at most
        `limit` mappings, and no recent walk of it took longer than SLOW_WALK_S while sleeping.

        A process can hold its mmap lock, which every PROCMAP_QUERY waits for, for milliseconds
        at a time. After a walk that slept that long, the process is looked at from the maps
        text on a worker thread for SLOW_WALK_PAUSE_S, a pause that doubles with each slow walk
        of it (up to SLOW_WALK_PAUSE_MAX_S): a process that keeps doing it stalls the caller's
        thread once in ten minutes at most, and one that did it once (or a sleep that was not
        its doing: a wait for the GIL) is walked again a second later. A walk that was only
        slow because its thread was preempted (a busy machine, a hypervisor's steal) says
        nothing of the process and counts for nothing: the thread's voluntary context switches
        tell the two apart, as a wait for a lock is one."""
        return 0 <= self.last_mappings <= limit and not (
            self.slow_walks and time.monotonic() < self._walk_again_at
        )

    def walk_mappings_of(self, dev: int, inode: int, limit: int) -> list[Vma]:
        """Every mapping of the file (dev, inode), by a PROCMAP_QUERY walk over all the
        process's mappings: one ioctl each (~0.6 us), where the maps text costs the kernel a
        formatted line and a path for each (a Python process: ~125 us walked, ~240 us as
        text). Raises TooManyMappings past `limit` mappings, and OSError as the maps text
        does.

        The GIL stays held through every ioctl (each is short, though it waits for the
        process's mmap lock: a walk that takes longer than SLOW_WALK_S and slept is counted in
        `slow_walks`): a walk that released it ~200 times would, while another thread runs
        Python, wait for it back each time. The walk is for a thread that may block for
        `limit` microseconds or so: the event loop, for a process `quick_to_walk`; any other is
        read as text on a worker thread (`mappings_of`), where the reads release the GIL. Like
        the text, the walk is not one atomic look (see `mappings_of`)."""
        files = self._files
        started = time.monotonic()
        slept = _voluntary_switches()
        try:
            try:
                return self._walk(files[0], dev, inode, limit)
            except OSError as exc:
                if exc.errno != errno.ESRCH or not self._renew(files):
                    raise
            return self._walk(self._files[0], dev, inode, limit)  # an execve: the new image
        finally:
            ended = time.monotonic()
            if ended - started > self.SLOW_WALK_S and _voluntary_switches() > slept:
                self.slow_walks += 1
                pause = self.SLOW_WALK_PAUSE_S * 2 ** min(self.slow_walks - 1, 30)
                self._walk_again_at = ended + min(pause, self.SLOW_WALK_PAUSE_MAX_S)

    def _walk(self, maps_fd: int, dev: int, inode: int, limit: int) -> list[Vma]:
        # The struct lives at the start of a buffer longer than CPython's fcntl.ioctl copies
        # (IOCTL_BUFSZ, 1024 bytes): a larger mutable buffer is handed to the kernel as it is,
        # with the GIL held (the interpreter releases it only around a call on its own copy,
        # as another thread could resize the caller's buffer meanwhile). Measured on a client
        # process of ~200 mappings: 125 us a walk this way, 141 us copied (and the GIL released
        # ~200 times: 7-11 ms while another thread runs Python), 216 us through ctypes.
        if maps_fd < 0:  # a closed view: fcntl.ioctl would raise ValueError, not this
            raise OSError(errno.EBADF, f"PROCMAP_QUERY of process {self.pid}: Bad file descriptor")
        buf = bytearray(_WALK_BUFFER)  # per call: a view may be asked from two threads
        found: list[Vma] = []
        seen = 0
        addr = 0
        # ~200 iterations a walk: locals, and only query_addr written each time (the kernel
        # writes the struct back with its inputs unchanged): ~15% less than packing it whole.
        ioctl = fcntl.ioctl
        request = PROCMAP_QUERY
        set_addr = _QUERY_ADDR.pack_into
        span_inode = _QUERY_SPAN_INODE.unpack_from
        _QUERY_IN.pack_into(buf, 0, ctypes.sizeof(ProcmapQuery), _WALK_FLAGS, 0)
        while True:
            set_addr(buf, _QUERY_ADDR_AT, addr)
            try:
                # SAFETY: buf holds a procmap_query (size 104) at offset 0 and is owned by this
                # call; its name and build-id sizes are zero, so the kernel writes nothing but
                # those 104 bytes.
                ioctl(maps_fd, request, buf, True)
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # no mapping at or above addr
                    break
                if exc.errno == errno.ENOTTY:
                    raise KernelFeatureMissing("PROCMAP_QUERY", "the kernel predates 6.11") from exc
                raise OSError(
                    exc.errno, f"PROCMAP_QUERY of process {self.pid}: {exc.strerror}"
                ) from exc
            start, addr, ino = span_inode(buf, _QUERY_OUT_AT)
            seen += 1
            if seen > limit:
                self.last_mappings = seen
                raise TooManyMappings(self.pid, limit)
            if ino == inode:
                _, end, flags, _, offset, _, major, minor = _QUERY_OUT.unpack_from(
                    buf, _QUERY_OUT_AT
                )
                if os.makedev(major, minor) == dev:
                    found.append(
                        Vma(
                            start,
                            end,
                            offset,
                            dev,
                            inode,
                            bool(flags & PROCMAP_QUERY_VMA_READABLE),
                            bool(flags & PROCMAP_QUERY_VMA_WRITABLE),
                            bool(flags & PROCMAP_QUERY_VMA_SHARED),
                        )
                    )
        self.last_mappings = seen
        return found

    def mappings_of(self, dev: int, inode: int) -> list[Vma]:
        """Every mapping of the file (dev, inode), from one read of the maps text.

        For a thread that must not hold the GIL long (a worker beside the event loop): the
        reads release it, a megabyte at a time. The kernel builds the text under the mmap lock
        a page at a time, so a process changing its mappings meanwhile can show a VMA twice
        or not at all: callers only trust a scan of a process that is not expected to be
        changing. `walk_mappings_of` is the cheaper form for a short look.
        """
        files = self._files
        text = self._maps_text(files[0])
        if not text and self._renew(files):  # never empty for a live image: an execve
            text = self._maps_text(self._files[0])
        self.last_mappings = text.count(b"\n")
        # Only the lines naming the inode are parsed (bytes.find runs in C): a Python process
        # has a few hundred lines, one or two of which matter.
        wanted = b" %d " % inode
        out = []
        pos = text.find(wanted)
        while pos >= 0:
            start_of_line = text.rfind(b"\n", 0, pos) + 1
            end_of_line = text.find(b"\n", pos)
            if end_of_line < 0:
                end_of_line = len(text)
            line = text[start_of_line:end_of_line]
            pos = text.find(wanted, end_of_line)
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

    @staticmethod
    def _maps_text(maps: int) -> bytes:
        # One large read: the kernel fills it in one pass (fewer lock rounds, fewer syscalls).
        chunks = []
        offset = 0
        while chunk := os.pread(maps, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _entries(self, addr: int, pages: int) -> list[int]:
        files = self._files
        data = os.pread(files[1], pages * 8, (addr // PAGE_SIZE) * 8)
        if not data and pages and self._renew(files):
            data = os.pread(self._files[1], pages * 8, (addr // PAGE_SIZE) * 8)
        return [entry for (entry,) in _PAGEMAP_ENTRY.iter_unpack(data)]

    def _scan(
        self, addr: int, pages: int, mask: int, inverted: int, anyof: int
    ) -> Iterator[tuple[int, int]]:
        """PAGEMAP_SCAN: the [start, end) address runs of matching pages in the range, a
        vector at a time (a caller that stops at the first run costs one ioctl); the kernel
        walks the page tables itself, so a GiB with few matches costs microseconds."""
        # Per call (a view may be asked from two threads); small at first: most scans find a
        # few runs or stop at the first, and 24 KB zeroed for each would cost more than the
        # ioctl (and evict as much of the cache). A full vector makes the next one larger.
        regions = _SCAN_FIRST_REGIONS
        vec = (PageRegion * regions)()
        start, end = addr, addr + pages * PAGE_SIZE
        arg = PmScanArg()
        while start < end:
            ctypes.memset(ctypes.addressof(arg), 0, ctypes.sizeof(arg))
            arg.size = ctypes.sizeof(arg)
            arg.start, arg.end = start, end
            arg.vec, arg.vec_len = ctypes.addressof(vec), regions
            arg.category_inverted, arg.category_mask = inverted, mask
            arg.category_anyof_mask = anyof
            # SAFETY: arg is a live 96-byte pm_scan_arg; vec is this call's own array of
            # `regions` page_regions, and vec_len is that; the kernel writes only
            # arg.walk_end and the first `count` entries of vec.
            count = fcntl.ioctl(self._pagemap, PAGEMAP_SCAN, arg)
            walked = arg.walk_end
            for i in range(count):
                yield vec[i].start, vec[i].end
            if walked <= start:
                break
            start = walked
            if count == regions and regions < _SCAN_REGIONS:
                regions = _SCAN_REGIONS
                vec = (PageRegion * regions)()

    def _scan_fallback(
        self, addr: int, pages: int, mask: int, inverted: int, anyof: int
    ) -> list[tuple[int, int]]:
        """The same answer from reading /proc/PID/pagemap entries (kernels before 6.14)."""
        out: list[tuple[int, int]] = []
        step = 1 << 16
        for base in range(0, pages, step):
            entries = self._entries(addr + base * PAGE_SIZE, min(step, pages - base))
            for index, entry in enumerate(entries):
                cats = 0
                if entry & _PAGEMAP_PRESENT:
                    cats |= PAGE_IS_PRESENT
                    if not entry & _PAGEMAP_UFFD_WP:
                        cats |= PAGE_IS_WRITTEN
                if entry & _PAGEMAP_SWAPPED:
                    cats |= PAGE_IS_SWAPPED
                if entry & _PAGEMAP_GUARD:
                    cats |= PAGE_IS_GUARD
                cats ^= inverted
                if (cats & mask) != mask or (anyof and not cats & anyof):
                    continue
                page = addr + (base + index) * PAGE_SIZE
                if out and out[-1][1] == page:
                    out[-1] = (out[-1][0], page + PAGE_SIZE)
                else:
                    out.append((page, page + PAGE_SIZE))
        return out

    def regions(
        self, addr: int, pages: int, *, mask: int = 0, inverted: int = 0, anyof: int = 0
    ) -> Iterator[tuple[int, int]]:
        """Address runs [start, end) of the pages of [addr, addr + pages) whose categories
        (PAGE_IS_*) match, as PAGEMAP_SCAN defines matching, lazily."""
        if self._has_scan:
            files = self._files
            scan = self._scan(addr, pages, mask, inverted, anyof)
            try:
                try:
                    first = next(scan, None)
                except OSError as exc:
                    if exc.errno != errno.ESRCH or not self._renew(files):
                        raise
                    scan = self._scan(addr, pages, mask, inverted, anyof)
                    first = next(scan, None)
            except OSError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._has_scan = False
            else:
                if first is not None:
                    yield first
                    yield from scan
                return
        yield from self._scan_fallback(addr, pages, mask, inverted, anyof)

    def reachable_regions(self, addr: int, pages: int) -> Iterator[tuple[int, int]]:
        """Runs of pages still mapped (present or swapped) and not guard-marked."""
        return self.regions(
            addr,
            pages,
            mask=PAGE_IS_GUARD,
            inverted=PAGE_IS_GUARD,
            anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        )

    def present_regions(self, addr: int, pages: int) -> Iterator[tuple[int, int]]:
        """Runs of pages present in the page table."""
        return self.regions(addr, pages, mask=PAGE_IS_PRESENT)

    def writable_regions(self, addr: int, pages: int) -> Iterator[tuple[int, int]]:
        """Runs of present pages without a userfaultfd write-protection (writable by a touch,
        in a writable mapping)."""
        return self.regions(addr, pages, mask=PAGE_IS_PRESENT | PAGE_IS_WRITTEN)

    def _fd_names(self) -> tuple[int, list[str]]:
        """The fd directory and the names in it (renewed when the task behind it was replaced
        by an execve from another thread)."""
        files = self._files
        try:
            return files[2], os.listdir(files[2])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH) or not self._renew(files):
                raise
            return self._files[2], os.listdir(self._files[2])

    def userfaultfds(self) -> list[int]:
        """The fd numbers of the userfaultfds the process holds."""
        found = []
        fd_dir, names = self._fd_names()
        for name in names:
            try:
                target = os.readlink(name, dir_fd=fd_dir)
            except FileNotFoundError:
                continue
            if target == "anon_inode:[userfaultfd]":
                found.append(int(name))
        return sorted(found)

    def unguarded_regions(self, addr: int, pages: int) -> Iterator[tuple[int, int]]:
        """Runs of pages without a guard marker (a touch would reach them)."""
        return self.regions(addr, pages, mask=PAGE_IS_GUARD, inverted=PAGE_IS_GUARD)

    def first_present(self, addr: int, pages: int) -> int | None:
        """Index of the first of `pages` pages from `addr` still mapped (present or swapped)."""
        found = next(self.reachable_regions(addr, pages), None)
        return (found[0] - addr) // PAGE_SIZE if found else None

    def first_unguarded(self, addr: int, pages: int) -> int | None:
        """Index of the first of `pages` pages from `addr` without a guard marker."""
        found = next(self.unguarded_regions(addr, pages), None)
        return (found[0] - addr) // PAGE_SIZE if found else None

    def fds_of(self, dev: int, inode: int) -> list[int]:
        """The fd numbers through which the process holds the file (dev, inode).

        Read through the /proc/PID/fd directory opened with the view (bound to that process,
        not to a pid that could be reused); fds closed while we look are skipped.
        """
        found = []
        fd_dir, names = self._fd_names()
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd_dir)
            except FileNotFoundError:
                continue
            if st.st_ino == inode and st.st_dev == dev:
                found.append(int(name))
        return sorted(found)

    def close(self) -> None:
        for fd in (*self._files, *self._retired, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._files = (-1, -1, -1)
        self._retired = []
        self._pidfd = -1
