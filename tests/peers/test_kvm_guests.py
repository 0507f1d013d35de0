"""KVM guests on broker memory, with real guest code on /dev/kvm (PEERS.md: KVM).

Topology 1: the VMM (this test process) creates the VM and a guest_memfd, imports it into the
broker as the owner and binds it by fd+offset; a backend in another process attaches as a VA
client. Topology 2: an orchestrator (this process) owns a broker memfd and grants a range to a
VMM process that pins it, maps it and backs a memslot with it.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

import membroker
from membroker import kvm
from membroker._sys import kvm as sys_kvm
from membroker._sys.mman import PROT_READ, PROT_WRITE, Mapping, mapping_count_for_inode
from tests.conftest import PeerProc

GMEM_OK, GMEM_WHY = sys_kvm.guest_memfd_support()
pytestmark = [pytest.mark.peer, pytest.mark.skipif(not GMEM_OK, reason=GMEM_WHY)]
PAGE = 4096
MiB = 1 << 20
VMM_PROC = Path(__file__).with_name("vmm_proc.py")


def test_topology_1_imported_guest_memfd_shared_with_a_backend(daemon, clients):
    with kvm.Vm() as vm, membroker.connect("vmm", daemon.runtime_dir) as session:
        gmem = vm.create_guest_memfd(MiB)
        try:
            space = session.import_space(gmem, name="guest0", regions=[membroker.Region(0, 0, MiB)])
            assert space.info.backing == "guest_memfd"
            with Mapping.map_shared(gmem, MiB, PROT_READ | PROT_WRITE) as mem:
                vm.map_slot(0, 0, MiB, mem.address, guest_memfd=gmem, guest_memfd_offset=0)
                # Guest code at 0x1000; the backend may touch [0x2000, 0x4000) only.
                mem.write(0x1000, kvm.store_byte(0x2000, 0x42) + kvm.load_al(0x3000) + kvm.HLT)
                space.share(0x2000, 2 * PAGE)
                space.grant("backend", 0x2000, 2 * PAGE)
                backend = clients("backend")
                backend.ok("attach_va", space=space.space_id)
                backend.ok("write", space=space.space_id, offset=0x3000, data="17")

                ex = vm.run(0x1000)
                assert (ex.reason, ex.al) == ("hlt", 0x17)  # the guest read the backend's byte
                got = backend.ok("read", space=space.space_id, offset=0x2000, length=1)
                assert got["data"] == "42"  # the backend reads the guest's store

                report = space.unshare(0x2000, 2 * PAGE)
                assert [c.outcome for c in report.clients] == ["acked"]
                # The guest keeps running on the now private range ...
                mem.write(0x3000, b"\x99")
                ex = vm.run(0x1000)
                assert (ex.reason, ex.al) == ("hlt", 0x99)
                # ... while the backend lost it: its touch is a crash, not a read.
                result = backend.cmd("touch", space=space.space_id, offset=0x2000)
                assert result.get("dead"), result
                assert backend.wait() in (-signal.SIGSEGV, -signal.SIGBUS)
                vm.remove_slot(0, 0)
            with pytest.raises(OSError) as info:
                os.pread(gmem, 16, 0)
            assert info.value.errno in (errno.ESPIPE, errno.EINVAL)
        finally:
            os.close(gmem)


def VmmProc(runtime_dir: Path) -> PeerProc:
    return PeerProc(VMM_PROC, runtime_dir, "vmm")


@pytest.mark.parametrize("how", ["revoke", "unshare"])
def test_topology_2_revoked_memslot_exits_to_mmio(daemon, how):
    with membroker.connect("orchestrator", daemon.runtime_dir) as orch:
        space = orch.create_space(4 * MiB)
        mem = space.map()
        mem.write(0x10000, b"\x5a")
        space.share(0x10000, 8 * PAGE)
        space.grant("vmm", 0x10000, 8 * PAGE)
        vmm = VmmProc(daemon.runtime_dir)
        try:
            vmm.ok("attach", space=space.space_id)
            vmm.ok("map", offset=0x10000, length=8 * PAGE, gpa=0x8000)
            ran = vmm.ok("run", gpa=0x8000)
            assert (ran["reason"], ran["al"]) == ("hlt", 0x5A)
            assert [p.client for p in orch.list_pins(space.space_id)] == ["vmm"]

            if how == "revoke":
                report = space.revoke("vmm", 0x10000, 8 * PAGE)
            else:
                report = space.unshare(0x10000, 8 * PAGE)
            assert [c.outcome for c in report.clients] == ["acked"], report
            # The VMM deleted the memslot, unmapped and unpinned before Revoke returned.
            assert vmm.ok("state") == {"ok": True, "slot": False, "pins": 0, "released": 1}
            assert orch.list_pins(space.space_id) == []
            st = os.fstat(space.fd)  # type: ignore[arg-type]
            assert mapping_count_for_inode(vmm.proc.pid, st.st_dev, st.st_ino) == 0
            # The guest's next access to that range exits to the VMM instead of reading memory.
            ran = vmm.ok("run", gpa=0x8000)
            assert (ran["reason"], ran["mmio_addr"]) == ("mmio", 0x8000)
        finally:
            vmm.close()
            mem.close()
