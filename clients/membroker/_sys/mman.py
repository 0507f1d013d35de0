"""Shared mappings of a backing fd (mmap/mprotect/madvise) and /proc/PID/maps inspection."""

from __future__ import annotations

import ctypes
import errno
import os
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from .libc import MAP_FAILED, PAGE_SIZE, KernelFeatureMissing, check, libc

__all__ = [
    "MADV_DONTNEED",
    "MADV_GUARD_INSTALL",
    "MADV_GUARD_REMOVE",
    "MADV_REMOVE",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "Mapping",
    "mapping_count_for_inode",
    "vma_count",
]

PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000  # x86_64 and aarch64

MADV_DONTNEED: Final = 4
MADV_DONTFORK: Final = 10
MADV_REMOVE: Final = 9
MADV_GUARD_INSTALL: Final = 102
MADV_GUARD_REMOVE: Final = 103

_ALL_PROT: Final = PROT_READ | PROT_WRITE


@dataclass
class _Region:
    """The address range a Mapping owns, kept apart from it so that a finalizer can unmap it."""

    address: int
    length: int
    # The one ctypes array every view() is a slice of; a weak reference, so that close() can
    # tell whether views are still alive.
    exporter: weakref.ref[ctypes.Array[ctypes.c_ubyte]] | None = None


def _munmap(address: int, length: int) -> None:
    # SAFETY: [address, address+length) is a range this module mapped and nothing else in the
    # process refers to any more (no Mapping, no live view).
    check(libc.munmap(address, length), "munmap")


def _release(region: _Region) -> None:
    """Unmap `region`, or if views of it are still alive, make it an inaccessible reservation.

    A view that outlives close() must never reach memory that a later mmap() placed at the same
    address, and the backing must really be unmapped now (revocation checks /proc/PID/maps for
    its inode). So the range is atomically replaced by anonymous PROT_NONE memory -- a stale view
    crashes with SIGSEGV -- and the reservation is unmapped when the last view is collected.
    """
    exporter = region.exporter() if region.exporter is not None else None
    if exporter is None:
        _munmap(region.address, region.length)
        return
    # SAFETY: MAP_FIXED over exactly our own range (same address and length we mapped), so it
    # replaces only our file mapping, atomically: the range is never free for another mmap().
    # fd -1 and offset 0 as MAP_ANONYMOUS requires; MAP_NORESERVE so the reservation costs no
    # commit charge.
    ret = libc.mmap(
        region.address,
        region.length,
        PROT_NONE,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
        -1,
        0,
    )
    if ret == MAP_FAILED:
        check(-1, "mmap(MAP_FIXED reservation)")
    weakref.finalize(exporter, _munmap, region.address, region.length)


def _zap_sealed(region: _Region) -> None:
    """The release of a sealed mapping: it cannot be unmapped, so its pages are zapped and the
    range stays reserved (each later touch is a fault the broker refuses) until the process
    exits."""
    # SAFETY: [address, +length) is our own sealed mapping; MADV_DONTNEED only drops this
    # process's page-table entries (a shared mapping's contents stay in the file).
    libc.madvise(region.address, region.length, MADV_DONTNEED)


class Mapping:
    """A MAP_SHARED mapping of (part of) a backing fd, at an address this object owns.

    The mapping does not keep the fd: it stays valid after the fd is closed. Views returned by
    view() are raw memory: touching one where the mapping is PROT_NONE, guarded or already closed
    kills the process with SIGSEGV (SIGBUS past the end of the file or on a private guest_memfd
    page). That is the point: a stray access crashes instead of corrupting the guest.
    """

    __slots__ = ("__weakref__", "_finalizer", "_region")

    def __init__(self, address: int, length: int) -> None:
        """Adopt an existing mapping of `length` bytes at `address`; use map_shared() instead."""
        self._region = _Region(address, length)
        self._finalizer = weakref.finalize(self, _release, self._region)

    @classmethod
    def map_shared(cls, fd: int, length: int, prot: int = PROT_NONE, offset: int = 0) -> Mapping:
        """mmap `length` bytes of `fd` from `offset`, MAP_SHARED, with protection `prot`.

        `length` and `offset` must be multiples of PAGE_SIZE (ValueError otherwise); a hugetlb
        backing needs multiples of its huge page size (the kernel answers EINVAL).
        """
        if length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"length {length} is not a positive multiple of {PAGE_SIZE}")
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"offset {offset} is not a non-negative multiple of {PAGE_SIZE}")
        if prot & ~_ALL_PROT:
            raise ValueError(f"prot {prot:#x} has bits other than PROT_READ|PROT_WRITE")
        # SAFETY: addr NULL lets the kernel choose a free range, so nothing existing is replaced;
        # length and offset are positive/non-negative page multiples checked above; fd is only
        # read by the kernel (EBADF if not open). Kernel gotchas, all answered with an errno:
        # PROT_WRITE on MAP_SHARED needs an fd opened O_RDWR (EACCES); a memfd sealed with
        # F_SEAL_WRITE/F_SEAL_FUTURE_WRITE refuses shared writable mappings (EPERM) and, with
        # FUTURE_WRITE, even a later mprotect(PROT_WRITE) of a read-only one; a guest_memfd
        # needs GUEST_MEMFD_FLAG_MMAP (ENODEV) and MAP_SHARED (EINVAL for MAP_PRIVATE).
        # A mapping may extend past the end of the file: touching that part is SIGBUS.
        address = libc.mmap(None, length, prot, MAP_SHARED, fd, offset)
        if address is None or address == MAP_FAILED:
            check(-1, "mmap")
        return cls(int(address), length)

    @property
    def address(self) -> int:
        return self._region.address

    @property
    def length(self) -> int:
        return self._region.length

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _range(self, offset: int, length: int, *, aligned: bool) -> int:
        """Check [offset, offset+length) lies inside the mapping; return its address."""
        if not self._finalizer.alive:
            raise ValueError("operation on a closed Mapping")
        if offset < 0 or length < 0 or offset + length > self._region.length:
            raise ValueError(
                f"range [{offset:#x}, +{length:#x}) is outside the mapping of "
                f"{self._region.length:#x} bytes"
            )
        if aligned and (offset % PAGE_SIZE or length % PAGE_SIZE or length == 0):
            raise ValueError(
                f"range [{offset:#x}, +{length:#x}) is not a non-empty run of whole pages"
            )
        return self._region.address + offset

    def protect(self, offset: int, length: int, prot: int) -> None:
        """mprotect a page-aligned sub-range to `prot` (PROT_NONE, PROT_READ, PROT_WRITE...)."""
        address = self._range(offset, length, aligned=True)
        if prot & ~_ALL_PROT:
            raise ValueError(f"prot {prot:#x} has bits other than PROT_READ|PROT_WRITE")
        # SAFETY: [address, +length) is a page-aligned sub-range of our own live mapping.
        # Gotcha: every distinct protection run is its own VMA (max_map_count is 65530); a
        # fragmented pattern should use guard_install() instead, which costs no VMA.
        check(libc.mprotect(address, length, prot), "mprotect")

    def remap(self, fd: int) -> None:
        """Replace the mapping, in place and PROT_NONE, by one of `fd` (a new description of
        the same file, say a read-write one): the addresses, and so every view, stay valid;
        protections and guard markers start over."""
        address = self._range(0, self._region.length, aligned=True)
        # SAFETY: MAP_FIXED over exactly our own live range, atomically: it is never free for
        # another mmap() meanwhile. fd is only read by the kernel.
        ret = libc.mmap(address, self._region.length, PROT_NONE, MAP_SHARED | MAP_FIXED, fd, 0)
        if ret is None or ret == MAP_FAILED:
            check(-1, "mmap(MAP_FIXED remap)")

    def seal(self) -> None:
        """Not inherited by children (MADV_DONTFORK), then sealed (mseal): from now on the
        mapping can be neither unmapped, moved nor re-protected, by anyone in this process.
        close() then zaps its pages instead of unmapping it."""
        from .uffd import mseal  # the one mseal wrapper lives with the userfaultfd calls

        address = self._range(0, self._region.length, aligned=True)
        # SAFETY: exactly our own live mapping; MADV_DONTFORK changes no contents.
        check(libc.madvise(address, self._region.length, MADV_DONTFORK), "madvise(MADV_DONTFORK)")
        mseal(address, self._region.length)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _zap_sealed, self._region)

    def discard(self, offset: int, length: int) -> None:
        """Drop this process's page-table entries for the range (MADV_DONTNEED)."""
        address = self._range(offset, length, aligned=True)
        # SAFETY: [address, +length) is a page-aligned sub-range of our own live mapping.
        # Gotcha: on a MAP_SHARED mapping MADV_DONTNEED only zaps *this process's* PTEs; the
        # page cache keeps the contents, other mappings still see them, and the next touch here
        # faults the same data back in. It revokes access only together with PROT_NONE or a
        # guard; it never frees or zeroes guest memory (that is fallocate(PUNCH_HOLE)).
        check(libc.madvise(address, length, MADV_DONTNEED), "madvise(MADV_DONTNEED)")

    def guard_install(self, offset: int, length: int) -> None:
        """Make the range fault with SIGSEGV (MADV_GUARD_INSTALL), without splitting the VMA."""
        self._guard(offset, length, MADV_GUARD_INSTALL, "MADV_GUARD_INSTALL")

    def guard_remove(self, offset: int, length: int) -> None:
        """Undo guard_install() on the range (MADV_GUARD_REMOVE); the contents are unchanged."""
        self._guard(offset, length, MADV_GUARD_REMOVE, "MADV_GUARD_REMOVE")

    def _guard(self, offset: int, length: int, advice: int, name: str) -> None:
        address = self._range(offset, length, aligned=True)
        # SAFETY: [address, +length) is a page-aligned sub-range of our own live mapping.
        # Gotcha: guard markers live in the page tables, so installing one also zaps the PTEs
        # of the range (like MADV_DONTNEED; a shared mapping keeps its page-cache contents).
        # Kernels before 6.13 do not know the advice, and before 6.15 refuse it on file-backed
        # mappings; hugetlb and VM_PFNMAP/VM_IO mappings refuse it too. All say EINVAL, and our
        # own arguments were validated above, so EINVAL here means the feature is missing.
        ret = libc.madvise(address, length, advice)
        if ret == -1 and ctypes.get_errno() == errno.EINVAL:
            raise KernelFeatureMissing(
                name, "guard regions are not supported for this mapping", errno.EINVAL
            )
        check(ret, f"madvise({name})")

    def view(self, offset: int, length: int) -> memoryview:
        """A writable, zero-copy memoryview of the mapped bytes [offset, offset+length).

        No copy and no check on access: where the mapping is PROT_NONE (or guarded) touching
        the view is a SIGSEGV that kills the process -- intended. A view that outlives close()
        is left pointing at an inaccessible reservation, never at unrelated memory.
        """
        self._range(offset, length, aligned=False)
        exporter = self._region.exporter() if self._region.exporter is not None else None
        if exporter is None:
            array_type = ctypes.c_ubyte * self._region.length
            # SAFETY: [address, +length) is exactly our live mapping; from_address copies
            # nothing and does not touch the memory (which may be PROT_NONE right now).
            exporter = array_type.from_address(self._region.address)
            self._region.exporter = weakref.ref(exporter)
        return memoryview(exporter).cast("B")[offset : offset + length]

    def read(self, offset: int, length: int) -> bytes:
        """Copy `length` bytes out of the mapping (SIGSEGV where it is not readable)."""
        address = self._range(offset, length, aligned=False)
        # SAFETY: [address, +length) lies inside our live mapping (checked above); string_at
        # copies into a new bytes object of exactly `length` bytes.
        return ctypes.string_at(address, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` (any contiguous buffer) into the mapping, one copy (SIGSEGV where it is
        not writable)."""
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        self.view(offset, len(src))[:] = src

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Copy len(buffer) bytes from `offset` into `buffer` (any writable contiguous buffer),
        one copy and no allocation; returns the count (SIGSEGV where it is not readable)."""
        dst = memoryview(buffer).cast("B")
        dst[:] = self.view(offset, len(dst))
        return len(dst)

    def close(self) -> None:
        """munmap the mapping; idempotent. Outstanding views then fault instead of reading."""
        self._finalizer()

    def __enter__(self) -> Mapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<Mapping address={self._region.address:#x} length={self._region.length:#x} {state}>"
        )


def _read_maps(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return f.read().splitlines()


def mapping_count_for_inode(pid: int, dev: int, ino: int) -> int:
    """How many VMAs of process `pid` map the file (dev, ino) -- e.g. a backing's fstat."""
    # Line format: "start-end perms offset MAJOR:MINOR inode [path]", the device in hex.
    # The text is generated under the mmap lock one page at a time, so a process that changes
    # its mappings while we read may show a VMA twice or not at all: callers verifying a revoke
    # must only trust "0" after the client has acknowledged.
    want = (os.major(dev), os.minor(dev))
    count = 0
    for line in _read_maps(pid):
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or int(fields[4]) != ino:
            continue
        major, _, minor = fields[3].partition(":")
        if (int(major, 16), int(minor, 16)) == want:
            count += 1
    return count


def vma_count(pid: int) -> int:
    """Number of VMAs of process `pid` (lines of /proc/PID/maps); compare to max_map_count."""
    return len(_read_maps(pid))
