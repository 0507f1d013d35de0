"""A real VMM process (topology 2): an fd+offset client of the broker that backs a KVM memslot
with a granted range. Driven by JSON lines on stdin, like tests/integration/client_proc.py.

Ops: attach SPACE; map OFFSET LENGTH GPA (pin, mmap, memslot 1); run (the guest reads GPA into
al and halts); state. On an unpin request or a revoke it deletes the memslot, unmaps and unpins
before the SDK acknowledges.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

import membroker
from membroker import kvm
from membroker._sys import memfd, mman

# The repository root, for the framing the test peers share (tests/peer_io.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.peer_io import answer, requests

LOW = 0x8000  # the VMM's own memory for code: GPA [0, 32 KiB)
CODE = 0x1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", default="vmm")
    args = parser.parse_args()
    session = membroker.connect(args.name, args.runtime_dir)
    vm = kvm.Vm()
    low_fd = memfd.create_memfd("vmm-low", LOW, sealed=False)
    low = mman.Mapping.map_shared(low_fd, LOW, mman.PROT_READ | mman.PROT_WRITE)
    vm.map_slot(0, 0, LOW, low.address)
    lock = threading.Lock()
    state: dict[str, Any] = {"mapping": None, "pin": None, "gpa": None, "released": 0}
    client: Any = None

    def release(_ranges: Any) -> None:
        # Stop using the range: memslot first (the guest can no longer reach it), then unmap,
        # then unpin. Runs on the SDK's session thread, before the acknowledgement.
        with lock:
            if state["mapping"] is None:
                return
            vm.remove_slot(1, state["gpa"])
            state["mapping"].close()
            state["pin"].unpin()
            state.update(mapping=None, pin=None)
            state["released"] += 1

    answer({"ready": True, "pid": os.getpid()})
    for req in requests():
        op = req["op"]
        try:
            if op == "attach":
                client = session.attach_fd(
                    req["space"], on_revoke=release, on_unpin_request=release
                )
                answer({"ok": True})
            elif op == "map":
                with lock:
                    pin = client.pin(req["offset"], req["length"], write=True)
                    mapping = mman.Mapping.map_shared(
                        client.fd, req["length"], mman.PROT_READ | mman.PROT_WRITE, req["offset"]
                    )
                    vm.map_slot(1, req["gpa"], req["length"], mapping.address)
                    state.update(mapping=mapping, pin=pin, gpa=req["gpa"])
                answer({"ok": True})
            elif op == "run":
                low.write(CODE, kvm.load_al(req["gpa"]) + kvm.HLT)
                ex = vm.run(CODE)
                answer({"ok": True, "reason": ex.reason, "al": ex.al, "mmio_addr": ex.mmio_addr})
            elif op == "state":
                with lock:
                    answer(
                        {
                            "ok": True,
                            "slot": state["mapping"] is not None,
                            "pins": len(client.pins),
                            "released": state["released"],
                        }
                    )
            else:
                answer({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    vm.close()
    session.close()


if __name__ == "__main__":
    main()
