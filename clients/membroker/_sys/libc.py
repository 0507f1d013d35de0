"""The process's libc through ctypes, its errno helper, and the exceptions every _sys module raises.

Errors, drawn once for the whole package::

    OSError                      what check() raises: the subclass the errno selects
     |                           (PermissionError for EPERM, FileNotFoundError for ENOENT, ...)
     +-- KernelFeatureMissing    the running kernel lacks something membroker needs;
                                 .feature names it, .errno is what the kernel answered

Every foreign function below is declared with its C prototype once, here, so that no caller
passes a Python int where the C side expects a pointer-sized or 64-bit value.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

__all__ = [
    "MAP_FAILED",
    "PAGE_SIZE",
    "KernelFeatureMissing",
    "SYS_memfd_create",
    "SYS_mseal",
    "SYS_pidfd_open",
    "SYS_pidfd_send_signal",
    "SYS_process_madvise",
    "SYS_userfaultfd",
    "check",
    "libc",
]

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")

# CDLL(None) is the global symbol namespace of this process, which always contains the libc the
# interpreter itself is linked against (glibc or musl) -- no guessing of a soname.
# use_errno=True makes ctypes save errno right after each foreign call, so ctypes.get_errno()
# in check() reads the errno of *that* call and not one clobbered by the interpreter meanwhile.
libc = ctypes.CDLL(None, use_errno=True)

# mmap() returns (void *)-1 on failure; as a c_void_p result that is the all-ones address.
MAP_FAILED: int = ctypes.c_void_p(-1).value or 0
assert (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1 == MAP_FAILED


def _declare(name: str, restype: type | None, *argtypes: type) -> None:
    func = getattr(libc, name)
    func.restype = restype
    func.argtypes = list(argtypes)


# void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
# off_t is 64-bit on every 64-bit Linux ABI, glibc and musl alike.
_declare(
    "mmap",
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
)
# int munmap(void *addr, size_t length);
_declare("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
# int mprotect(void *addr, size_t len, int prot);
_declare("mprotect", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# int madvise(void *addr, size_t length, int advice);
_declare("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# int ioctl(int fd, unsigned long request, ...);  -- every ioctl we issue passes one pointer or one
# integer as the variadic argument; both travel in a general-purpose register on x86_64 and
# aarch64, so declaring it as a void * is exact for both uses.
_declare("ioctl", ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
# int fstatfs(int fd, struct statfs *buf);
_declare("fstatfs", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)

# Syscall numbers for the calls Python has no wrapper for on every build. The numbers of syscalls
# added after 2019 are shared by all architectures (asm-generic unified table); the older ones
# differ between x86_64 and the asm-generic table aarch64 uses.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"memfd_create": 319, "userfaultfd": 323},
    "aarch64": {"memfd_create": 279, "userfaultfd": 282},
}
_machine = platform.machine()
if _machine not in _SYSCALLS:
    raise ImportError(f"membroker._sys supports x86_64 and aarch64, not {_machine!r}")
SYS_memfd_create: int = _SYSCALLS[_machine]["memfd_create"]
SYS_userfaultfd: int = _SYSCALLS[_machine]["userfaultfd"]
SYS_pidfd_send_signal: int = 424
SYS_pidfd_open: int = 434
SYS_process_madvise: int = 440
SYS_mseal: int = 462


class KernelFeatureMissing(OSError):
    """The running kernel does not offer `feature`; `errno` is what it answered (or ENOSYS)."""

    def __init__(self, feature: str, reason: str, err: int | None = errno.ENOSYS) -> None:
        code = errno.ENOSYS if err is None else err
        super().__init__(code, f"kernel feature missing: {feature}: {reason}")
        self.feature = feature
        self.reason = reason
        self._code = code

    def __reduce__(self) -> tuple[type[KernelFeatureMissing], tuple[str, str, int]]:
        return (type(self), (self.feature, self.reason, self._code))


def check(ret: int, what: str) -> int:
    """Return `ret` unless it is -1; then raise the OSError subclass for the saved errno.

    Only valid right after a call through `libc` (use_errno=True): the errno read is the one
    ctypes saved when that foreign call returned.
    """
    if ret != -1:
        return ret
    err = ctypes.get_errno()
    # OSError(errno, msg) picks the subclass itself: EPERM -> PermissionError, EAGAIN ->
    # BlockingIOError, ENOENT -> FileNotFoundError; that is the one errno mapping of _sys.
    raise OSError(err, f"{what}: {os.strerror(err)}")
