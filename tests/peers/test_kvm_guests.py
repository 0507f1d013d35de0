"""KVM guests on broker memory, with real guest code on /dev/kvm (PEERS.md: KVM).

Topology 1: the VMM (this test process) creates the VM and a guest_memfd, imports it into the
broker as the owner and binds it by fd+offset; a backend in another process attaches as a VA
client. Topology 2: an orchestrator (this process) owns a broker memfd and grants a range to a
VMM process that pins it, maps it and backs a memslot with it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import membroker
from membroker import kvm
from membroker._sys import kvm as sys_kvm
from membroker._sys.mman import PROT_READ, PROT_WRITE, Mapping, mapping_count_for_inode
from tests.conftest import _env

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


class VmmProc:
    def __init__(self, runtime_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(VMM_PROC), "--runtime-dir", str(runtime_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        assert self._read().get("ready")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 30)[0]:
            raise TimeoutError("the VMM did not answer")
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else ""
        result: dict[str, Any] = json.loads(line)
        return result

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        out = self._read()
        assert out.get("ok"), out
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ok("exit")
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


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
