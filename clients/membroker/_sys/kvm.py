"""KVM ioctls for guest_memfd backings: /dev/kvm, a VM, KVM_CREATE_GUEST_MEMFD, capability probe."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from types import TracebackType
from typing import Final

from .libc import PAGE_SIZE, KernelFeatureMissing, check, libc

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "KVM_CHECK_EXTENSION",
    "KVM_CREATE_GUEST_MEMFD",
    "KVM_CREATE_VM",
    "KVM_GET_API_VERSION",
    "GuestMemfdFactory",
    "KvmCreateGuestMemfd",
    "check_extension",
    "create_guest_memfd",
    "create_vm",
    "guest_memfd_support",
    "open_kvm",
]

# include/uapi/asm-generic/ioctl.h: nr bits 0-7, type bits 8-15, size bits 16-29, dir 30-31
# (x86_64 and aarch64 both use the generic layout).
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _size_of(arg: int | type[ctypes.Structure]) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not (0 <= type_ < 1 << _IOC_TYPEBITS and 0 <= nr < 1 << _IOC_NRBITS):
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} out of range")
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        direction << _IOC_DIRSHIFT
        | type_ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
        | size << _IOC_SIZESHIFT
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, arg: int | type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ, type_, nr, _size_of(arg))


def _IOW(type_: int, nr: int, arg: int | type[ctypes.Structure]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size_of(arg))


def _IOWR(type_: int, nr: int, arg: int | type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size_of(arg))


# include/uapi/linux/kvm.h
KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12
KVM_GET_API_VERSION: Final = _IO(KVMIO, 0x00)
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1

_SHARED_MMAP_FLAGS: Final = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


class KvmCreateGuestMemfd(ctypes.Structure):
    """`struct kvm_create_guest_memfd` (64 bytes), the argument of KVM_CREATE_GUEST_MEMFD.

    offset  size  field
         0     8  size         bytes, a non-zero multiple of PAGE_SIZE
         8     8  flags        GUEST_MEMFD_FLAG_*; unknown bits are EINVAL
        16    48  reserved[6]  must be zero
    """

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


assert ctypes.sizeof(KvmCreateGuestMemfd) == 64

KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, KvmCreateGuestMemfd)
assert KVM_CREATE_GUEST_MEMFD == 0xC040AED4


def _ioctl_int(fd: int, request: int, arg: int, what: str) -> int:
    # SAFETY: `request` is an _IO() number: the kernel takes `arg` as a plain integer and
    # dereferences no user memory; fd is only read (EBADF/ENOTTY for a wrong fd).
    return check(libc.ioctl(fd, request, arg), what)


def open_kvm() -> int:
    """Open /dev/kvm O_RDWR|O_CLOEXEC; the fd is owned by the caller."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise KernelFeatureMissing("/dev/kvm", "no such device node", e.errno) from e
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise KernelFeatureMissing("/dev/kvm", "KVM is not loaded", e.errno) from e
        raise
    try:
        version = _ioctl_int(fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            raise KernelFeatureMissing(
                "KVM API 12", f"/dev/kvm reports API version {version}", errno.EINVAL
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_vm(kvm_fd: int, vm_type: int = 0) -> int:
    """KVM_CREATE_VM on an open /dev/kvm; returns the VM fd (owned, close-on-exec).

    VM ioctls only work from the process (mm) that created the VM; the fd may be passed on,
    but only to keep the VM alive.
    """
    return _ioctl_int(kvm_fd, KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION: 0 if absent, else a capability-specific positive value.

    Ask the VM fd rather than /dev/kvm where the answer depends on the VM type.
    """
    return _ioctl_int(fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")


def create_guest_memfd(vm_fd: int, size: int, flags: int) -> int:
    """KVM_CREATE_GUEST_MEMFD on `vm_fd`; returns the guest_memfd (owned, close-on-exec).

    EINVAL for a size that is not a positive multiple of PAGE_SIZE or for unknown flags.
    The guest_memfd keeps its VM alive: closing the VM fd afterwards is fine.
    """
    if size < 0 or size >= 1 << 64 or flags < 0 or flags >= 1 << 64:
        raise OSError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: size {size} / flags {flags:#x}")
    arg = KvmCreateGuestMemfd(size=size, flags=flags)
    # SAFETY: `arg` is a live, zero-initialised (reserved[] = 0) 64-byte struct owned by this
    # frame, exactly the size encoded in KVM_CREATE_GUEST_MEMFD; the kernel reads it only during
    # the call. vm_fd is only read: /dev/kvm answers EINVAL, a non-KVM fd ENOTTY.
    ret = libc.ioctl(vm_fd, KVM_CREATE_GUEST_MEMFD, ctypes.byref(arg))
    fd = check(ret, "KVM_CREATE_GUEST_MEMFD")
    try:
        # Gotcha: unlike KVM_CREATE_VM, the kernel installs the guest_memfd WITHOUT
        # close-on-exec (verified on 6.18), so a concurrent fork+exec could leak it until here.
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    except BaseException:
        os.close(fd)
        raise
    return fd


def guest_memfd_support() -> tuple[bool, str]:
    """Whether this host can make shareable guest_memfds: (True, summary) or (False, why not).

    Opens /dev/kvm, creates a VM, checks KVM_CAP_GUEST_MEMFD and that KVM_CAP_GUEST_MEMFD_FLAGS
    includes MMAP|INIT_SHARED, creates one page of guest_memfd; closes everything.
    """
    fds: list[int] = []
    try:
        try:
            fds.append(open_kvm())
        except OSError as e:
            return False, f"cannot open /dev/kvm: {e.strerror or e}"
        try:
            fds.append(create_vm(fds[0]))
        except OSError as e:
            return False, f"KVM_CREATE_VM failed: {e.strerror}"
        vm_fd = fds[1]
        if check_extension(vm_fd, KVM_CAP_GUEST_MEMFD) <= 0:
            return False, "kernel lacks KVM_CAP_GUEST_MEMFD (guest_memfd, Linux 6.8+)"
        flags = check_extension(vm_fd, KVM_CAP_GUEST_MEMFD_FLAGS)
        if flags & _SHARED_MMAP_FLAGS != _SHARED_MMAP_FLAGS:
            missing = []
            if not flags & GUEST_MEMFD_FLAG_MMAP:
                missing.append("GUEST_MEMFD_FLAG_MMAP")
            if not flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                missing.append("GUEST_MEMFD_FLAG_INIT_SHARED")
            return False, (
                f"KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}: kernel lacks {' and '.join(missing)}"
                " (mmap-able shared guest_memfd, Linux 6.18+)"
            )
        try:
            fds.append(create_guest_memfd(vm_fd, PAGE_SIZE, _SHARED_MMAP_FLAGS))
        except OSError as e:
            return False, f"KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED) failed: {e.strerror}"
        return True, f"guest_memfd with MMAP|INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS={flags:#x})"
    finally:
        for fd in reversed(fds):
            os.close(fd)


class GuestMemfdFactory:
    """Makes shareable guest_memfds (MMAP|INIT_SHARED) from one /dev/kvm fd and one VM.

    Both fds are opened on the first create(). A guest_memfd holds a reference to its VM, so the
    fds it returned stay valid after close(). Such a guest_memfd can only be bound to memslots
    of this factory's VM; a VMM that runs a guest creates the guest_memfd on its own VM instead.
    """

    __slots__ = ("_closed", "_kvm_fd", "_vm_fd")

    def __init__(self) -> None:
        self._kvm_fd: int | None = None
        self._vm_fd: int | None = None
        self._closed = False

    def _vm(self) -> int:
        if self._closed:
            raise ValueError("create() on a closed GuestMemfdFactory")
        if self._vm_fd is None:
            kvm_fd = open_kvm()
            try:
                self._vm_fd = create_vm(kvm_fd)
            except BaseException:
                os.close(kvm_fd)
                raise
            self._kvm_fd = kvm_fd
        return self._vm_fd

    def create(self, size: int) -> int:
        """A new guest_memfd of `size` bytes, MMAP|INIT_SHARED, owned by the caller."""
        return create_guest_memfd(self._vm(), size, _SHARED_MMAP_FLAGS)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the VM and /dev/kvm fds; idempotent. Created guest_memfds remain usable."""
        vm_fd, kvm_fd = self._vm_fd, self._kvm_fd
        self._vm_fd = self._kvm_fd = None
        self._closed = True
        for fd in (vm_fd, kvm_fd):
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> GuestMemfdFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"vm_fd={self._vm_fd} kvm_fd={self._kvm_fd}"
        return f"<GuestMemfdFactory {state}>"


# -- a minimal VMM: memslots, one vCPU in real mode ---------------------------------------------

KVM_CREATE_VCPU: Final = _IO(KVMIO, 0x41)
KVM_GET_VCPU_MMAP_SIZE: Final = _IO(KVMIO, 0x04)
KVM_RUN: Final = _IO(KVMIO, 0x80)
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
KVM_EXIT_IO: Final = 2
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTERNAL_ERROR: Final = 17


class KvmUserspaceMemoryRegion2(ctypes.Structure):
    """struct kvm_userspace_memory_region2 (160 bytes): slot, flags, guest_phys_addr,
    memory_size, userspace_addr, guest_memfd_offset, guest_memfd, pad1, pad2[14]."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    ]


assert ctypes.sizeof(KvmUserspaceMemoryRegion2) == 160
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(KVMIO, 0x49, KvmUserspaceMemoryRegion2)


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (x86_64, 144 bytes): the general registers, rip, rflags."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


assert ctypes.sizeof(KvmRegs) == 144
KVM_GET_REGS: Final = _IOR(KVMIO, 0x81, KvmRegs)
KVM_SET_REGS: Final = _IOW(KVMIO, 0x82, KvmRegs)
# struct kvm_sregs is 312 bytes; only the code segment is touched here: kvm_segment cs at
# offset 0 is {u64 base; u32 limit; u16 selector; ...}.
KVM_SREGS_SIZE: Final = 312
KVM_GET_SREGS: Final = _IOR(KVMIO, 0x83, KVM_SREGS_SIZE)
KVM_SET_SREGS: Final = _IOW(KVMIO, 0x84, KVM_SREGS_SIZE)
# struct kvm_run: exit_reason (u32) at offset 8; the exit union at offset 32, for MMIO
# {u64 phys_addr; u8 data[8]; u32 len; u8 is_write}.
_RUN_EXIT_REASON = 8
_RUN_MMIO = 32


def set_memory_region(
    vm_fd: int,
    slot: int,
    gpa: int,
    size: int,
    userspace_addr: int,
    *,
    guest_memfd: int = -1,
    guest_memfd_offset: int = 0,
) -> None:
    """KVM_SET_USER_MEMORY_REGION2; size 0 deletes the slot. With guest_memfd the slot is
    bound by fd+offset (KVM only accepts a guest_memfd created on the same VM)."""
    region = KvmUserspaceMemoryRegion2(
        slot=slot,
        flags=KVM_MEM_GUEST_MEMFD if guest_memfd >= 0 else 0,
        guest_phys_addr=gpa,
        memory_size=size,
        userspace_addr=userspace_addr,
        guest_memfd_offset=guest_memfd_offset if guest_memfd >= 0 else 0,
        guest_memfd=guest_memfd if guest_memfd >= 0 else 0,
    )
    # SAFETY: region is a live 160-byte struct; KVM only reads it. userspace_addr must stay
    # mapped while the slot exists: the caller deletes the slot before unmapping.
    fcntl.ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION2, region)


class Vcpu:
    """One vCPU of a VM, in real mode, with its kvm_run page mapped."""

    def __init__(self, kvm_fd: int, vm_fd: int, index: int = 0) -> None:
        self.fd = _ioctl_int(vm_fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            size = _ioctl_int(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            # SAFETY: the kvm_run area is `size` bytes at offset 0 of the vCPU fd.
            self._run = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        sregs = bytearray(KVM_SREGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS, sregs)
        # Real mode with a flat 64 KiB code segment at 0: guest addresses are GPAs below 1 MiB.
        struct.pack_into("<Q", sregs, 0, 0)  # cs.base
        struct.pack_into("<H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(self.fd, KVM_SET_SREGS, sregs)

    def regs(self) -> KvmRegs:
        regs = KvmRegs()
        fcntl.ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def start_at(self, rip: int) -> None:
        regs = KvmRegs()
        regs.rip = rip
        regs.rflags = 0x2  # bit 1 is reserved and must be set
        fcntl.ioctl(self.fd, KVM_SET_REGS, regs)

    def run(self) -> int:
        """Runs until the next exit; returns the exit reason (KVM_EXIT_*)."""
        fcntl.ioctl(self.fd, KVM_RUN, 0)
        reason: int = struct.unpack_from("<I", self._run, _RUN_EXIT_REASON)[0]
        return reason

    def mmio(self) -> tuple[int, bytes, bool]:
        """After KVM_EXIT_MMIO: (guest-physical address, data, is_write)."""
        (phys,) = struct.unpack_from("<Q", self._run, _RUN_MMIO)
        (length,) = struct.unpack_from("<I", self._run, _RUN_MMIO + 16)
        data = bytes(self._run[_RUN_MMIO + 8 : _RUN_MMIO + 8 + length])
        return phys, data, bool(self._run[_RUN_MMIO + 20])

    def close(self) -> None:
        if self.fd >= 0:
            self._run.close()
            os.close(self.fd)
            self.fd = -1
