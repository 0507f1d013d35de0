"""The image a test client execs into (client_proc.py, op "exec_liar"): it inherits the session
socket (already past Hello, attached as an fd client) and the space's fd, maps the fd read-write,
closes it, and then acknowledges every revocation on the raw socket without unmapping anything.

argv: SOCKET_FD SPACE_FD LENGTH. Speaks the tests' JSON lines on stdin/stdout: a first line
{"ready": true, "pid": ..., "address": ...}, then "read" (a byte of the mapping, at "offset"),
"acked" (how many revocations it acknowledged) and "exit".
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import selectors
import socket
import sys
from typing import Any

from membroker import wire
from membroker.v1 import session_pb2 as pb


def main() -> None:
    sock_fd, space_fd, length = (int(a) for a in sys.argv[1:4])
    mem = mmap.mmap(space_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(space_fd)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    sock = socket.socket(fileno=sock_fd)
    decoder = wire.FrameDecoder(max_frame=16 << 20)
    acked = 0

    def out(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    out({"ready": True, "pid": os.getpid(), "address": address})
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                line = sys.stdin.readline()
                if not line:
                    return
                req = json.loads(line)
                if req["op"] == "exit":
                    out({"ok": True})
                    return
                if req["op"] == "read":
                    out({"ok": True, "value": mem[req["offset"]]})
                elif req["op"] == "acked":
                    out({"ok": True, "acked": acked})
                continue
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
            if not data:
                sel.unregister(sock)  # the broker hung up; keep the mapping and go on
                continue
            for frame, taken in decoder.feed(data, fds):
                for fd in taken:
                    os.close(fd)
                if frame.WhichOneof("body") == "revoke" and not frame.revoke.more:
                    ack = pb.RevokeAck(space_id=frame.revoke.space_id, seq=frame.revoke.seq)
                    sock.sendall(wire.encode(pb.Frame(revoke_ack=ack)))
                    acked += 1


if __name__ == "__main__":
    main()
