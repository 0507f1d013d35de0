"""A real client process for the integration tests, driven by JSON lines on stdin.

Each line is {"op": ..., ...}; each answer one JSON line on stdout. Ops: attach_va, attach_fd,
read, write, touch (read one byte through the raw mapping, unchecked: may die of SIGSEGV),
hold / touch_held (keep a view across a revocation, touch it later), poke,
lie (ack revokes without tearing down), map_fd (map the FdClient's fd directly), vmas,
access_enter / access_read / access_exit (an access() block held open across commands),
pin, unpin, ranges, truncate, pread, close, exit, loaded (which heavy modules and files this
process has loaded), hold_mmap_lock / release_mmap_lock (a thread
that keeps the process's mmap lock busy), exec_liar (become exec_liar.py, which keeps
the session and lies), close_session / end_session_keeping (end the session honestly, or at the
socket keeping everything), session_state; own_create / own (this process as an
owner: create a space, then share, unshare, grant, revoke, delete, revocations, seq on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import membroker

# The repository root, for the framing the test peers share (tests/peer_io.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.peer_io import answer, requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    session = membroker.connect(args.name, args.runtime_dir)
    revokes: list[Any] = []
    attached: dict[str, Any] = {}
    pins: dict[int, Any] = {}
    held: dict[str, memoryview] = {}
    kept: list[Any] = []
    blocks: dict[str, Any] = {}

    answer({"ready": True, "pid": os.getpid(), "session_id": session.session_id})
    for req in requests():
        op = req["op"]
        try:
            if op == "attach_va":
                c = session.attach_va(
                    req["space"],
                    on_revoke=lambda r: revokes.append(len(r)),
                    # MEMBROKER_TEST_VA_MODE: the whole suite's VA clients in one mode (the
                    # second CI pass runs the revocation suites cooperatively).
                    mode=req.get("mode", os.environ.get("MEMBROKER_TEST_VA_MODE", "auto")),
                )
                attached[req["space"]] = c
                answer({"ok": True, "address": c.address, "ranges": _ranges(c), "mode": c.mode})
            elif op == "attach_va_rogue":
                # A sealed client that cheats in one way ("keep_fd", "no_seal", "own_uffd",
                # "other_uffd") and is expected to be refused; or "slow_seal": an honest one
                # that takes `delay` seconds between mapping the space and sealing it.
                from membroker._sys import mman
                from membroker._sys import uffd as sys_uffd

                how = req["how"]
                real_map = mman.Mapping.map_shared
                real_seal = mman.Mapping.seal
                real_create = sys_uffd.Uffd.create

                def map_keeping(fd: int, *a: Any, real_map: Any = real_map, **k: Any) -> Any:
                    kept.append(os.dup(fd))
                    return real_map(fd, *a, **k)

                def other_uffd(*a: Any, real_create: Any = real_create, **k: Any) -> Any:
                    # A uffd registered over the mapping by this process itself is kept; the
                    # broker is sent a fresh one.
                    mine = real_create(*a, **k)
                    kept.append(mine)
                    return real_create(*a, **k)

                if how == "keep_fd":
                    mman.Mapping.map_shared = map_keeping  # type: ignore[assignment]
                elif how == "no_seal":
                    mman.Mapping.seal = lambda self: None  # type: ignore[method-assign]
                elif how == "own_uffd":
                    kept.append(real_create())
                elif how == "slow_seal":

                    def slow_seal(
                        self: Any, real_seal: Any = real_seal, delay: float = req["delay"]
                    ) -> None:
                        time.sleep(delay)
                        real_seal(self)

                    mman.Mapping.seal = slow_seal  # type: ignore[method-assign]
                elif how == "other_uffd":
                    sys_uffd.Uffd.create = other_uffd  # type: ignore[method-assign]

                    def seal_and_register(self: Any, real_seal: Any = real_seal) -> None:
                        kept[-1].register(
                            self.address, self.length, sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR
                        )
                        real_seal(self)

                    mman.Mapping.seal = seal_and_register  # type: ignore[method-assign]
                try:
                    c = session.attach_va(req["space"], mode="sealed")
                    attached[req["space"]] = c
                    answer({"ok": True, "mode": c.mode})
                finally:
                    mman.Mapping.map_shared = real_map  # type: ignore[method-assign]
                    mman.Mapping.seal = real_seal  # type: ignore[method-assign]
                    sys_uffd.Uffd.create = real_create  # type: ignore[method-assign]
            elif op == "mapping_attacks":
                # What a compromised backend tries on its own sealed mapping: each answer is the
                # errno (0: it worked).
                import ctypes

                from membroker._sys.libc import libc as clib

                client = attached[req["space"]]
                addr, size = client.address, client.size
                mremap = clib.mremap
                mremap.restype = ctypes.c_void_p
                mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
                results = {}
                ret = clib.mprotect(addr, 4096, 3)
                results["mprotect"] = ctypes.get_errno() if ret == -1 else 0
                ret = clib.munmap(addr, 4096)
                results["munmap"] = ctypes.get_errno() if ret == -1 else 0
                moved = mremap(addr, size, size, 1)  # MREMAP_MAYMOVE
                results["mremap"] = ctypes.get_errno() if moved in (None, 2**64 - 1) else 0
                answer({"ok": True, "errno": results})
            elif op == "fork_with_mapping":
                # A compromised backend undoes MADV_DONTFORK and forks: the child sleeps, then
                # reads the page at `offset` (which the parent had faulted in).
                import ctypes
                import time as _time

                from membroker._sys.libc import libc as clib

                client = attached[req["space"]]
                ret = clib.madvise(client.address, client.size, 11)  # MADV_DOFORK
                if ret != 0:
                    answer({"ok": False, "errno": ctypes.get_errno()})
                    continue
                child = os.fork()
                if child == 0:
                    _time.sleep(req.get("sleep", 1.0))
                    value = client.view(req["offset"], 1, check=False)[0]
                    os._exit(100 + value % 100)
                answer({"ok": True, "child": child})
            elif op == "reap":
                _, status = os.waitpid(req["pid"], 0)
                answer(
                    {
                        "ok": True,
                        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1,
                    }
                )
            elif op == "procmem_read":
                # Reads through /proc/self/mem (FOLL_FORCE): what PROT_NONE does not stop.
                client = attached[req["space"]]
                try:
                    with open("/proc/self/mem", "rb", buffering=0) as mem:
                        mem.seek(client.address + req["offset"])
                        data = mem.read(req.get("length", 8))
                    answer({"ok": True, "data": data.hex()})
                except OSError as exc:
                    answer({"ok": True, "errno": exc.errno})
            elif op == "present_pages":
                # Pages of the mapping present in this process's page table (pagemap).
                from membroker._sys.proc import ProcessView

                client = attached[req["space"]]
                view = ProcessView(os.getpid())
                try:
                    pages = []
                    for start, end in view.present_regions(client.address, client.size // 4096):
                        pages += range(
                            (start - client.address) // 4096, (end - client.address) // 4096
                        )
                finally:
                    view.close()
                answer({"ok": True, "pages": pages})
            elif op == "fd_attacks":
                # What an fd holder tries beyond its grants: pwrite, punch a hole, map it
                # writable. Each answer is the errno (0: it worked).
                import fcntl
                import mmap

                fd = attached[req["space"]].fd
                results = {}
                try:
                    os.pwrite(fd, b"\xee", req["offset"])
                    results["pwrite"] = 0
                except OSError as exc:
                    results["pwrite"] = exc.errno
                import ctypes

                from membroker._sys.libc import libc as clib

                # fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, 4096)
                ret = clib.fallocate(fd, 3, ctypes.c_int64(req["offset"]), ctypes.c_int64(4096))
                results["punch"] = 0 if ret == 0 else ctypes.get_errno()
                try:
                    mm = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    mm.close()
                    results["mmap_rw"] = 0
                except OSError as exc:
                    results["mmap_rw"] = exc.errno
                answer(
                    {
                        "ok": True,
                        "errno": results,
                        "read_only": fcntl.fcntl(fd, fcntl.F_GETFL) & 3 == 0,
                    }
                )
            elif op == "attach_fd":
                c = session.attach_fd(req["space"], on_revoke=lambda r: revokes.append(len(r)))
                attached[req["space"]] = c
                answer({"ok": True, "ranges": _ranges(c)})
            elif op == "exec_liar":
                # Replace this program image, keeping the session socket (past Hello) and the
                # FdClient's fd: the new image (exec_liar.py) maps the fd, closes it and acks
                # every revoke without unmapping. Answers first: the next line is the new
                # image's own {"ready": ...}.
                sock_fd = session._sock.fileno()
                space_fd = attached[req["space"]].fd
                os.set_inheritable(sock_fd, True)
                os.set_inheritable(space_fd, True)
                answer({"ok": True})
                liar = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exec_liar.py")
                args = [str(sock_fd), str(space_fd), str(req["length"])]
                os.execv(sys.executable, [sys.executable, liar, *args])
            elif op == "ranges_of_nothing":
                # One control call that changes nothing (opens the gRPC channel).
                answer({"ok": True, "spaces": len(session.list_spaces())})
            elif op == "ranges":
                answer({"ok": True, "ranges": _ranges(attached[req["space"]]), "revokes": revokes})
            elif op == "read":
                data = attached[req["space"]].read(req["offset"], req["length"])
                answer({"ok": True, "data": data.hex()})
            elif op == "write":
                attached[req["space"]].write(req["offset"], bytes.fromhex(req["data"]))
                answer({"ok": True})
            elif op == "touch":
                view = attached[req["space"]].view(req["offset"], 1, check=False)
                value = view[0]
                answer({"ok": True, "value": value})
            elif op == "lie":
                # A client that acknowledges revokes without tearing anything down.
                attached[req["space"]]._teardown = lambda ranges: None
                answer({"ok": True})
            elif op == "protect_only":
                # A client that only mprotects on revoke: its pages stay mapped.
                from membroker._sys import mman

                client = attached[req["space"]]

                def protect_only(ranges: Any, client: Any = client) -> None:
                    for r in ranges:
                        client.mapping.protect(r.offset, r.length, mman.PROT_NONE)

                client._teardown = protect_only
                answer({"ok": True})
            elif op == "detach_keeping":
                # Detaches at the broker without letting go of anything here (a raw Detach).
                from membroker.v1 import broker_pb2 as pb

                session.call("Detach", pb.DetachRequest(space_id=req["space"]))
                answer({"ok": True})
            elif op == "ballast":
                # Touches this many MiB of anonymous memory: its exit then takes a while to
                # free it, and meanwhile /proc/PID reads of it fail (its mm is gone) while its
                # pidfd does not yet say it exited.
                kept.append(bytearray(req["mib"] << 20))
                answer({"ok": True})
            elif op == "close_session":
                # Ends the session with its attachments still open (the SDK lets go of them
                # first). The process stays, with no session: later ops that need one fail.
                session.close()
                answer({"ok": True})
            elif op == "end_session_keeping":
                # Ends the session at the socket, keeping every attachment's fd and mapping
                # here (a raw client's close, or an SDK whose teardown is broken).
                import socket as socket_mod

                for client in attached.values():
                    client._release = lambda: None
                session._sock.shutdown(socket_mod.SHUT_RDWR)
                answer({"ok": True})
            elif op == "session_state":
                # Whether the session has ended, why, and whether it was fenced; `call`: make
                # one control call first and report how it failed.
                error = ""
                if req.get("call"):
                    try:
                        session.list_spaces()
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                answer(
                    {
                        "ok": True,
                        "closed": session.closed,
                        "reason": session.closed_reason,
                        "fenced": session.fenced,
                        "error": error,
                    }
                )
            elif op == "map_fd":
                # A client that maps the fd it was given, beyond what it holds.
                from membroker._sys import mman

                client = attached[req["space"]]
                extra = mman.Mapping.map_shared(
                    client.fd, req["length"], mman.PROT_READ | mman.PROT_WRITE, req["offset"]
                )
                kept.append(extra)
                answer({"ok": True, "address": extra.address})
            elif op == "second_map":
                # A hostile VA client: reopens its own mapping through /proc/self/map_files (a
                # new fd of the space without the broker) and maps a second, read-write view of
                # [offset, offset+length) elsewhere. keep_fd keeps that fd open too.
                from membroker._sys import mman

                client = attached[req["space"]]
                lo, hi = client.address, client.address + client.size
                fd = os.open(f"/proc/self/map_files/{lo:x}-{hi:x}", os.O_RDWR)
                extra = mman.Mapping.map_shared(
                    fd, req["length"], mman.PROT_READ | mman.PROT_WRITE, req["offset"]
                )
                if req.get("keep_fd"):
                    kept.append(fd)
                else:
                    os.close(fd)
                kept.append(extra)
                answer({"ok": True, "address": extra.address})
            elif op == "second_read":
                # Reads through the second view (index into the last second_map).
                extra = [k for k in kept if hasattr(k, "view")][-1]
                answer({"ok": True, "value": extra.view(req["offset"], 1)[0]})
            elif op == "report_mapped":
                # A false Mapped report: says the space is mapped at an unrelated address.
                from membroker._sys import mman
                from membroker._sys.libc import libc as clib
                from membroker.v1 import session_pb2 as spb

                client = attached[req["space"]]
                decoy = clib.mmap(
                    None, client.size, mman.PROT_NONE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS, -1, 0
                )
                session._send(
                    spb.Frame(
                        mapped=spb.Mapped(space_id=req["space"], address=decoy, length=client.size)
                    )
                )
                answer({"ok": True, "address": decoy})
            elif op == "refuse_revokes":
                # An fd client whose teardown (its on_revoke callback) fails.
                def refuse(ranges: Any) -> None:
                    raise RuntimeError("memslot delete failed: EBUSY")

                attached[req["space"]]._user_on_revoke = refuse
                answer({"ok": True})
            elif op == "slow_revokes":
                # An honest client whose teardown takes `delay` seconds (its on_revoke callback
                # sleeps), then succeeds: past a short deadline it acknowledges too late.
                delay = float(req["delay"])
                attached[req["space"]]._user_on_revoke = lambda ranges, d=delay: time.sleep(d)
                answer({"ok": True})
            elif op == "access_enter":
                # Opens a `with va.access(...)` block and keeps it open across commands.
                cm = attached[req["space"]].access(req["offset"], req["length"])
                blocks[req["space"]] = (cm, cm.__enter__())
                answer({"ok": True})
            elif op == "access_read":
                answer({"ok": True, "value": blocks[req["space"]][1][req["index"]]})
            elif op == "access_exit":
                blocks.pop(req["space"])[0].__exit__(None, None, None)
                answer({"ok": True})
            elif op == "vmas":
                # VMAs inside this client's mapping of the space.
                client = attached[req["space"]]
                lo, hi = client.address, client.address + client.size
                count = 0
                with open("/proc/self/maps") as maps:
                    for line in maps:
                        start = int(line.split("-", 1)[0], 16)
                        count += lo <= start < hi
                answer({"ok": True, "vmas": count})
            elif op == "loaded":
                heavy = ("grpc", "asyncio", "ssl")
                with open("/proc/self/maps") as maps:
                    lines = maps.read().splitlines()
                files = {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) > 5}
                answer(
                    {
                        "ok": True,
                        "modules": [m for m in heavy if m in sys.modules],
                        "files": sorted(os.path.basename(f) for f in files),
                        "mappings": len(lines),
                    }
                )
            elif op == "hold_mmap_lock":
                # A thread that keeps this process's mmap lock taken for writing, milliseconds
                # at a time: it dirties every page of an anonymous mapping of `mib` MiB
                # (MADV_POPULATE_WRITE) and write-protects it (mprotect rewrites every PTE,
                # with the lock held), over and over, until "release_mmap_lock".
                blocks["mmap_lock"] = _MmapLockHolder(req["mib"] << 20)
                answer({"ok": True})
            elif op == "release_mmap_lock":
                blocks.pop("mmap_lock").stop()
                answer({"ok": True})
            elif op == "hold":
                # A pointer the backend keeps across a revocation (a stale descriptor, say).
                held[req["space"]] = attached[req["space"]].view(req["offset"], 1, check=False)
                answer({"ok": True})
            elif op == "touch_held":
                answer({"ok": True, "value": held[req["space"]][0]})
            elif op == "poke":
                view = attached[req["space"]].view(req["offset"], 1, check=False)
                view[0] = req["value"]
                answer({"ok": True})
            elif op == "pin":
                pin = attached[req["space"]].pin(req["offset"], req["length"])
                pins[pin.pin_id] = pin
                answer({"ok": True, "pin_id": pin.pin_id})
            elif op == "unpin":
                pins.pop(req["pin_id"]).unpin()
                answer({"ok": True})
            elif op == "truncate":
                os.ftruncate(attached[req["space"]].fd, req["size"])
                answer({"ok": True})
            elif op == "pread":
                data = os.pread(attached[req["space"]].fd, req["length"], req["offset"])
                answer({"ok": True, "data": data.hex()})
            elif op == "close":
                attached.pop(req["space"]).close()
                answer({"ok": True})
            elif op == "own_create":
                # This process as an owner (a second owner in a process of its own): creates a
                # space and keeps the handle in `attached` under "owned:<space id>".
                owned = session.create_space(req["size"])
                attached["owned:" + owned.space_id] = owned
                st = os.fstat(owned.fd)
                answer({"ok": True, "space": owned.space_id, "dev": st.st_dev, "ino": st.st_ino})
            elif op == "own":
                # One owner call on a space created by own_create: share, unshare, grant, revoke
                # (with "deadline_s": a raw call given up after that many seconds), delete,
                # revocations, seq. Reports come back as dicts; broker errors with their code.
                from membroker.errors import BrokerError
                from membroker.types import RevocationReport
                from membroker.v1 import broker_pb2 as pb
                from membroker.v1 import session_pb2 as spb

                def report(r: Any) -> dict[str, Any]:
                    return {
                        "seq": r.seq,
                        "cause": r.cause,
                        "revoked_bytes": r.revoked_bytes,
                        "caller_gone": r.caller_gone,
                        "clients": [
                            [c.client, c.outcome, c.fence, c.pid, c.reason] for c in r.clients
                        ],
                    }

                owned = attached["owned:" + req["space"]]
                call = req["call"]
                try:
                    if call == "share":
                        result = report(owned.share(req["offset"], req["length"]))
                    elif call == "unshare":
                        result = report(owned.unshare(req["offset"], req["length"]))
                    elif call == "grant":
                        args = (req["client"], req["offset"], req["length"], req["access"])
                        result = {"seq": owned.grant(*args)}
                    elif call == "revoke" and req.get("deadline_s"):
                        rng = spb.Range(offset=req["offset"], length=req["length"])
                        request = pb.RevokeRequest(
                            space_id=owned.space_id, client=req["client"], range=rng
                        )
                        resp = session.call("Revoke", request, timeout=req["deadline_s"])
                        result = report(RevocationReport.from_pb(resp))
                    elif call == "revoke":
                        result = report(owned.revoke(req["client"], req["offset"], req["length"]))
                    elif call == "delete":
                        # The handle stays: a later call meets the broker's NOT_FOUND.
                        result = report(owned.delete())
                    elif call == "revocations":
                        reports = owned.revocations(req["after_seq"])
                        result = {"reports": [report(r) for r in reports]}
                    elif call == "seq":
                        result = {"seq": owned.refresh().seq}
                    else:
                        raise ValueError(f"unknown owner call {call}")
                    answer({"ok": True, **result})
                except BrokerError as exc:
                    answer({"ok": False, "code": exc.code_name, "error": str(exc)})
            else:
                answer({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            answer(
                {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "errno": getattr(exc, "errno", None),
                    "trace": traceback.format_exc(),
                }
            )
    session.close()


class _MmapLockHolder:
    def __init__(self, size: int) -> None:
        import ctypes
        import mmap
        import threading

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.size = size
        self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _call(self, name: str, *args: int) -> None:
        import ctypes

        fn = getattr(self.libc, name)
        if fn(ctypes.c_void_p(args[0]), ctypes.c_size_t(args[1]), *args[2:]) != 0:
            raise OSError(ctypes.get_errno(), f"{name} failed")

    def _run(self) -> None:
        populate_write, read, read_write = 23, 1, 3  # MADV_POPULATE_WRITE, PROT_*
        while not self.stop_event.is_set():
            self._call("madvise", self.address, self.size, populate_write)
            self._call("mprotect", self.address, self.size, read)
            self._call("mprotect", self.address, self.size, read_write)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


def _ranges(client: Any) -> list[list[Any]]:
    return [[r.offset, r.length, r.access.name] for r in client.ranges()]


if __name__ == "__main__":
    main()
