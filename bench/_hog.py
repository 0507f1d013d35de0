"""A client process for bench/vma_hog_bench.py: makes `vmas` extra mappings (mprotect of every
other page of one anonymous region: each call splits it), attaches to the space as an fd client
and maps its first page, then follows commands on stdin, one per line:

    revokes   acknowledge revocations honestly (unmap the page in on_revoke), and map it again
              when it is granted back ("remap")
    remap     map the first page again
    detach    close its fd but keep the mapping, and detach (the broker fences and kills it)

It prints "ready <maps lines>" once attached.
"""

from __future__ import annotations

import ctypes
import os
import sys

import membroker
from membroker.v1 import broker_pb2 as pb

PAGE = 4096
PROT_READ, MAP_SHARED, MAP_PRIVATE_ANON = 1, 1, 0x22


def main() -> None:
    runtime_dir, space_id, vmas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    if vmas:
        base = libc.mmap(None, 2 * vmas * PAGE, 3, MAP_PRIVATE_ANON, -1, 0)
        for i in range(vmas):
            libc.mprotect(base + 2 * i * PAGE, PAGE, PROT_READ)
    mapped: list[int] = []

    def unmap(_ranges: object) -> None:
        while mapped:
            libc.munmap(mapped.pop(), PAGE)

    session = membroker.connect("hog", runtime_dir)
    client = session.attach_fd(space_id, on_revoke=unmap)

    def remap() -> None:
        mapped.append(libc.mmap(None, PAGE, PROT_READ, MAP_SHARED, client.fd, 0))

    remap()
    with open(f"/proc/{os.getpid()}/maps") as f:
        lines = sum(1 for _ in f)
    print("ready", lines, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "remap":
            remap()
        elif cmd == "detach":
            # A liar: closes its fd but keeps the mapping, and detaches.
            client._release = lambda: None
            os.close(client.fd)
            client.fd = -1
            session.call("Detach", pb.DetachRequest(space_id=space_id))
        print("ok", flush=True)


if __name__ == "__main__":
    main()
