"""userfaultfd and mseal: the kernel half of the sealed VA mode.

A sealed VA client maps the whole space, makes a userfaultfd, seals the mapping and hands the
uffd to the broker. From then on every first touch of a page is an event the broker answers
(`continue_`, `zeropage`, `poison`) and the broker can write-protect the client's pages itself
(`writeprotect`). The uffd ioctls act on the address space of the process that *created* the
uffd, whoever calls them: that is what lets the broker work on a client's memory.

Layouts and numbers are those of include/uapi/linux/userfaultfd.h (UFFD_API 0xAA); every
structure is 64-bit fields only, so one layout fits x86_64 and aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Final

from .libc import KernelFeatureMissing, SYS_mseal, SYS_userfaultfd, check, libc

__all__ = [
    "FEATURES_SEALED",
    "MODE_MINOR",
    "MODE_MISSING",
    "MODE_WP",
    "Fault",
    "Uffd",
    "mseal",
    "mseal_available",
    "vma_flags",
]

_UFFDIO: Final = 0xAA
UFFD_API: Final = 0xAA


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_UFFDIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_UFFDIO << 8) | nr


UFFDIO_API: Final = _iowr(0x3F, 24)
UFFDIO_REGISTER: Final = _iowr(0x00, 32)
UFFDIO_UNREGISTER: Final = _ior(0x01, 16)
UFFDIO_WAKE: Final = _ior(0x02, 16)
UFFDIO_ZEROPAGE: Final = _iowr(0x04, 32)
UFFDIO_WRITEPROTECT: Final = _iowr(0x06, 24)
UFFDIO_CONTINUE: Final = _iowr(0x07, 32)
UFFDIO_POISON: Final = _iowr(0x08, 32)

MODE_MISSING: Final = 1
MODE_WP: Final = 2
MODE_MINOR: Final = 4

FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
FEATURE_EVENT_FORK: Final = 1 << 1
FEATURE_MISSING_SHMEM: Final = 1 << 5
FEATURE_THREAD_ID: Final = 1 << 8
FEATURE_MINOR_SHMEM: Final = 1 << 10
FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
FEATURE_WP_UNPOPULATED: Final = 1 << 13
FEATURE_POISON: Final = 1 << 14

# What the sealed mode needs of the kernel. Not EVENT_REMOVE/UNMAP: those would block the client
# in MADV_DONTNEED until the broker read the event. EVENT_FORK keeps a forked child's copy of
# the mapping under a broker-held uffd instead of dropping the registration in the child.
FEATURES_SEALED: Final = (
    FEATURE_PAGEFAULT_FLAG_WP
    | FEATURE_EVENT_FORK
    | FEATURE_MISSING_SHMEM
    | FEATURE_THREAD_ID
    | FEATURE_MINOR_SHMEM
    | FEATURE_WP_HUGETLBFS_SHMEM
    | FEATURE_WP_UNPOPULATED
    | FEATURE_POISON
)

EVENT_PAGEFAULT: Final = 0x12
EVENT_FORK: Final = 0x13
FLAG_WRITE: Final = 1
FLAG_WP: Final = 2
FLAG_MINOR: Final = 4

_WP_MODE_WP: Final = 1
_CONTINUE_MODE_WP: Final = 2
_UFFD_USER_MODE_ONLY: Final = 1

MSG_SIZE: Final = 32
_MSG: Final = struct.Struct("=B3xI QQQ")  # event, pad, then the 24-byte union as three u64


@dataclass(frozen=True, slots=True)
class Fault:
    """One message read from a uffd: a page fault (address, flags, thread) or a fork."""

    event: int
    flags: int
    address: int
    tid: int
    # For EVENT_FORK: the new uffd, installed in the reader's fd table (owned by the caller).
    child_fd: int = -1

    @property
    def write(self) -> bool:
        return bool(self.flags & FLAG_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & FLAG_WP)

    @property
    def minor(self) -> bool:
        return bool(self.flags & FLAG_MINOR)


class Uffd:
    """A userfaultfd: made here (`create`) or adopted from a peer (`Uffd(fd)`).

    Owns its fd. The operations act on the address space of the process that created it.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, features: int = FEATURES_SEALED) -> Uffd:
        """A new non-blocking uffd of this process, handshaken for `features`.

        Kernel-mode faults too where the process may ask for them (CAP_SYS_PTRACE, or
        vm.unprivileged_userfaultfd = 1): then a read() into the mapping, or a /proc/self/mem
        access, is decided by the broker like a touch. Otherwise user-mode faults only, and
        such kernel accesses of pages not yet mapped in fail (EFAULT/EIO).
        KernelFeatureMissing when the kernel has no userfaultfd or lacks one of `features`.
        """
        base = os.O_CLOEXEC | os.O_NONBLOCK
        fd = libc.syscall(SYS_userfaultfd, base)
        if fd == -1 and ctypes.get_errno() == errno.EPERM:
            fd = libc.syscall(SYS_userfaultfd, base | _UFFD_USER_MODE_ONLY)
        if fd == -1:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise KernelFeatureMissing("userfaultfd", os.strerror(err), err)
            check(-1, "userfaultfd")
        self = cls(fd)
        try:
            buf = bytearray(struct.pack("=QQQ", UFFD_API, features, 0))
            try:
                fcntl.ioctl(fd, UFFDIO_API, buf)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise KernelFeatureMissing(
                        "userfaultfd features", f"{features:#x} not all offered", exc.errno
                    ) from exc
                if exc.errno == errno.EPERM:
                    # Fork events need CAP_SYS_PTRACE (a container drops it, say).
                    raise KernelFeatureMissing(
                        "userfaultfd features",
                        f"{features:#x} not permitted to this process (fork events need "
                        "CAP_SYS_PTRACE)",
                        exc.errno,
                    ) from exc
                raise
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def available_features() -> int:
        """The features this kernel's userfaultfd offers (0 if it has none)."""
        try:
            probe = Uffd.create(0)
        except OSError:
            return 0
        try:
            # A second UFFDIO_API on the same fd is refused; a fresh handshake with features 0
            # reports every supported feature in the answer, so ask once more on a new fd.
            fd = libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
            if fd == -1:
                return 0
            try:
                buf = bytearray(struct.pack("=QQQ", UFFD_API, 0, 0))
                fcntl.ioctl(fd, UFFDIO_API, buf)
                return int(struct.unpack("=QQQ", buf)[1])
            finally:
                os.close(fd)
        finally:
            probe.close()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def register(self, address: int, length: int, mode: int) -> None:
        buf = bytearray(struct.pack("=QQQQ", address, length, mode, 0))
        fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf)

    def unregister(self, address: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, bytearray(struct.pack("=QQ", address, length)))

    def wake(self, address: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_WAKE, bytearray(struct.pack("=QQ", address, length)))

    def _fill(self, request: int, what: str, address: int, length: int, mode: int) -> int:
        """One of the page-filling ioctls; returns the bytes it did (partial on EEXIST etc.).

        The kernel stops at the first page it cannot fill and reports how far it got in the
        last field (or -errno there when it did nothing); OSError only when nothing was done.
        """
        buf = bytearray(struct.pack("=QQQq", address, length, mode, 0))
        try:
            fcntl.ioctl(self.fd, request, buf)
        except OSError as exc:
            done = struct.unpack_from("=q", buf, 24)[0]
            if done > 0:
                return int(done)
            raise OSError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}") from None
        return int(struct.unpack_from("=q", buf, 24)[0])

    def continue_(self, address: int, length: int, *, wp: bool = False) -> int:
        """Map pages already in the file (MINOR faults), write-protected if `wp`."""
        return self._fill(
            UFFDIO_CONTINUE, "UFFDIO_CONTINUE", address, length, _CONTINUE_MODE_WP if wp else 0
        )

    def zeropage(self, address: int, length: int) -> int:
        """Fill holes of the file with zeroed pages and map them (MISSING faults)."""
        return self._fill(UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", address, length, 0)

    def poison(self, address: int, length: int) -> int:
        """Make touches of these (not present) pages a SIGBUS in the uffd's process."""
        return self._fill(UFFDIO_POISON, "UFFDIO_POISON", address, length, 0)

    def writeprotect(self, address: int, length: int, protect: bool = True) -> None:
        """Write-protect (or release) the range, present pages and holes alike."""
        buf = bytearray(struct.pack("=QQQ", address, length, _WP_MODE_WP if protect else 0))
        fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, buf)

    def read_events(self, limit: int = 64) -> list[Fault]:
        """The messages waiting now (non-blocking; [] when none)."""
        try:
            data = os.read(self.fd, MSG_SIZE * limit)
        except BlockingIOError:
            return []
        out = []
        for pos in range(0, len(data) - len(data) % MSG_SIZE, MSG_SIZE):
            event, _pad, a, b, c = _MSG.unpack_from(data, pos)
            if event == EVENT_FORK:
                out.append(Fault(event, 0, 0, 0, child_fd=a & 0xFFFFFFFF))
            else:
                out.append(Fault(event, a, b, c & 0xFFFFFFFF))
        return out


def mseal(address: int, length: int) -> None:
    """Seal [address, address+length): no mprotect, munmap, mremap of it any more (6.10+)."""
    ret = libc.syscall(SYS_mseal, ctypes.c_ulong(address), ctypes.c_size_t(length), 0)
    if ret == -1:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise KernelFeatureMissing("mseal", "the kernel predates 6.10", err)
        check(-1, "mseal")


def mseal_available() -> bool:
    """Whether the kernel has mseal (a zero-length call seals nothing and answers 0)."""
    return bool(libc.syscall(SYS_mseal, ctypes.c_ulong(0), ctypes.c_size_t(0), 0) == 0)


def vma_flags(pid: int, address: int) -> frozenset[str]:
    """The smaps VmFlags (two-letter codes) of the VMA starting at `address` in process `pid`.

    `sl` sealed, `um`/`ui`/`uw` registered for missing/minor/write-protect faults, `dc` not
    copied on fork. Empty when no VMA starts there.
    """
    want = b"%x-" % address
    with open(f"/proc/{pid}/smaps", "rb") as f:
        text = f.read()
    pos = text.find(b"\n" + want)
    if pos < 0:
        if not text.startswith(want):
            return frozenset()
        pos = 0
    flags_at = text.find(b"VmFlags:", pos)
    if flags_at < 0:
        return frozenset()
    end = text.find(b"\n", flags_at)
    return frozenset(text[flags_at + 8 : end if end >= 0 else len(text)].decode().split())
