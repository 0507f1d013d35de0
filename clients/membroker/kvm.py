"""A minimal VMM helper for KVM guests on broker memory: a VM, memslots, one real-mode vCPU.

For VMM authors and the tests: enough to bind guest memory by fd+offset (an imported
guest_memfd) or by address (a pinned, mapped range of a broker memfd) and run a few bytes of
real guest code against it. VM ioctls work only in the process that created the VM, and KVM
binds only a guest_memfd created on the same VM: the VMM creates both and imports the fd.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from membroker._sys import kvm as sys_kvm

HLT = b"\xf4"


def store_byte(addr: int, value: int) -> bytes:
    """Real-mode `mov byte [addr], value` (addr below 64 KiB, DS = 0)."""
    return b"\xc6\x06" + struct.pack("<HB", addr, value)


def load_al(addr: int) -> bytes:
    """Real-mode `mov al, [addr]`."""
    return b"\xa0" + struct.pack("<H", addr)


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    """Why KVM_RUN returned: "hlt", "mmio" (with the address and direction) or another."""

    reason: str
    al: int
    mmio_addr: int | None = None
    mmio_write: bool = False


_REASONS = {
    sys_kvm.KVM_EXIT_HLT: "hlt",
    sys_kvm.KVM_EXIT_MMIO: "mmio",
    sys_kvm.KVM_EXIT_IO: "io",
    sys_kvm.KVM_EXIT_SHUTDOWN: "shutdown",
    sys_kvm.KVM_EXIT_FAIL_ENTRY: "fail_entry",
    sys_kvm.KVM_EXIT_INTERNAL_ERROR: "internal_error",
}


class Vm:
    """One KVM VM with one vCPU (created on first run)."""

    def __init__(self) -> None:
        self.kvm_fd = sys_kvm.open_kvm()
        try:
            self.vm_fd = sys_kvm.create_vm(self.kvm_fd)
        except BaseException:
            os.close(self.kvm_fd)
            raise
        self._vcpu: sys_kvm.Vcpu | None = None

    def create_guest_memfd(self, size: int) -> int:
        """A guest_memfd of this VM, mappable and initially shared; owned by the caller."""
        return sys_kvm.create_guest_memfd(
            self.vm_fd, size, sys_kvm.GUEST_MEMFD_FLAG_MMAP | sys_kvm.GUEST_MEMFD_FLAG_INIT_SHARED
        )

    def map_slot(
        self,
        slot: int,
        gpa: int,
        size: int,
        userspace_addr: int,
        *,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
    ) -> None:
        sys_kvm.set_memory_region(
            self.vm_fd,
            slot,
            gpa,
            size,
            userspace_addr,
            guest_memfd=guest_memfd,
            guest_memfd_offset=guest_memfd_offset,
        )

    def remove_slot(self, slot: int, gpa: int) -> None:
        """Deletes a memslot: the guest's next access there exits to the VMM as MMIO."""
        sys_kvm.set_memory_region(self.vm_fd, slot, gpa, 0, 0)

    def run(self, rip: int) -> Exit:
        """Runs the vCPU from `rip` (real mode, CS base 0) to its next exit."""
        if self._vcpu is None:
            self._vcpu = sys_kvm.Vcpu(self.kvm_fd, self.vm_fd)
        self._vcpu.start_at(rip)
        reason = self._vcpu.run()
        al = self._vcpu.regs().rax & 0xFF
        if reason == sys_kvm.KVM_EXIT_MMIO:
            addr, _, is_write = self._vcpu.mmio()
            return Exit("mmio", al, addr, is_write)
        return Exit(_REASONS.get(reason, f"exit {reason}"), al)

    def close(self) -> None:
        if self._vcpu is not None:
            self._vcpu.close()
            self._vcpu = None
        for fd in (self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.vm_fd = self.kvm_fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
