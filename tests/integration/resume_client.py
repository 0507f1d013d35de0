"""A client process for the resume tests (tests/integration/test_resume.py, tests/deploy),
driven by JSON lines on stdin like client_proc.py: a session that resumes by itself across a
broker restart or upgrade, holding one VaClient.

Ops: attach_va {space, mode}; attach_fd_and_map {space} (an FdClient, and a mapping of its
fd this process keeps whatever happens to the session); read {offset, length} (through the
attachment: NotHeld if not held); raw_read {offset, length} (through the mapping, unchecked);
holds {offset, length}; status (session and attachment state: resumes, resumed, dropped,
ranges, closed); perms {offset} (the mapping's protection at that offset, from
/proc/self/maps); exit.

`--steal TOKEN`: instead, say Hello on a fresh connection with that resume token (as
`--uid`, if given, after importing as root) and print the broker's answer; `--resume 0` turns
the session's own resuming off.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import membroker
from membroker import wire
from membroker.v1 import session_pb2 as spb

# The repository root, for the framing the test peers share (tests/peer_io.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.peer_io import answer, requests


def steal(runtime_dir: str, name: str, token: str, uid: int) -> None:
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(os.path.join(runtime_dir, "session.sock"))
        hello = spb.Hello(
            protocol_version=wire.PROTOCOL_VERSION, client_name=name, resume_token=token
        )
        s.sendall(wire.encode(spb.Frame(hello=hello)))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            decoder = wire.FrameDecoder()
            frames = decoder.feed(data, [])
            decoder.close()
            if frames:
                frame = frames[0][0]
                kind = frame.WhichOneof("body")
                body = getattr(frame, kind)
                print(
                    json.dumps(
                        {
                            "kind": kind,
                            "code": getattr(body, "code", 0),
                            "message": getattr(body, "message", ""),
                            "resumed": getattr(body, "resumed", False),
                        }
                    )
                )
                return
    print(json.dumps({"kind": "eof"}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--steal", default="")
    parser.add_argument("--uid", type=int, default=-1)
    parser.add_argument("--resume", type=float, default=30.0)
    args = parser.parse_args()
    if args.steal:
        steal(args.runtime_dir, args.name, args.steal, args.uid)
        return
    session = membroker.Session(args.name, args.runtime_dir, resume=args.resume)
    va: Any = None
    kept: list[mmap.mmap] = []

    answer({"ready": True, "pid": os.getpid(), "resume_token": session.resume_token})
    for req in requests():
        op = req["op"]
        try:
            if op == "attach_va":
                va = session.attach_va(req["space"], mode=req.get("mode", "cooperative"))
                answer({"ok": True, "address": va.address, "mode": va.mode})
            elif op == "attach_fd_and_map":
                # A client that keeps a mapping of its own, whatever its session does.
                fdc = session.attach_fd(req["space"])
                kept.append(mmap.mmap(fdc.fd, fdc.size, mmap.MAP_SHARED, mmap.PROT_READ))
                answer({"ok": True})
            elif op == "read":
                answer({"ok": True, "data": va.read(req["offset"], req["length"]).hex()})
            elif op == "raw_read":
                answer({"ok": True, "data": va.mapping.read(req["offset"], req["length"]).hex()})
            elif op == "holds":
                answer({"ok": True, "holds": va.holds(req["offset"], req["length"])})
            elif op == "status":
                answer(
                    {
                        "ok": True,
                        "resumes": session.resumes,
                        "closed": session.closed_reason,
                        "session_id": session.session_id,
                        "resumed": va.resumed if va is not None else 0,
                        "dropped": va.dropped if va is not None else None,
                        "ranges": [[r.offset, r.length, r.access.name] for r in va.ranges()]
                        if va is not None
                        else [],
                    }
                )
            elif op == "perms":
                answer({"ok": True, "perms": _perms(va.address + req["offset"])})
            else:
                answer({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            answer(
                {
                    "ok": False,
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "trace": traceback.format_exc(),
                }
            )
    session.close()


def _perms(addr: int) -> str:
    """The protection of the mapping covering `addr` ('' when nothing is mapped there)."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    return ""


if __name__ == "__main__":
    main()
