"""The client process of bench/sealed_bench.py: times first touches, fault latency and
bandwidth from inside a client, through a VA attachment (sealed or cooperative) and through a
plain mapping of the same memfd (the native baseline).

    python bench/_sealed_client.py RUNTIME_DIR CLIENT_NAME SPACE_ID

One command per stdin line, one JSON answer per stdout line:

    va MODE        attach as a VA client in MODE (sealed / cooperative); answers the mode
    fd             attach as an fd client NAME-fd and keep the fd (for the native baseline)
    seq            first touch of every page of the VA mapping, in order: seconds
    native_seq     the same through a fresh plain MAP_SHARED mapping of the fd: seconds
    rand N STEP    N first touches of random pages (multiples of STEP pages): each in seconds
    bw             steady-state read and write bandwidth of the VA mapping (GB/s)
    native_bw      the same through a plain mapping of the fd
    memcpy_bw      the same between two anonymous buffers
    write0         write page 0 (present and writable afterwards)
"""

from __future__ import annotations

import json
import mmap
import random
import sys
import time

import membroker

PAGE = 4096


def first_touch(view: memoryview) -> float:
    """Reads one byte of every page, in order (a strided copy in C: no Python per page)."""
    t0 = time.perf_counter()
    bytes(view[::PAGE])
    return time.perf_counter() - t0


def bandwidth(view: memoryview) -> tuple[float, float]:
    """(read GB/s, write GB/s) over `view`, best of 5 (the pages are already mapped in)."""
    size = len(view)
    src = bytes(size)
    dst = memoryview(bytearray(size))
    dst[:] = src  # the destination's pages are faulted in before the clock runs
    reads, writes = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        dst[:] = view
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        view[:] = src
        writes.append(time.perf_counter() - t0)
    return size / min(reads) / 1e9, size / min(writes) / 1e9


def main() -> None:
    runtime_dir, name, space_id = sys.argv[1:4]
    session = membroker.connect(name, runtime_dir)
    va = fdc = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        cmd = words[0]
        out: object
        if cmd == "va":
            va = session.attach_va(space_id, mode=words[1])
            out = va.mode
        elif cmd == "fd":
            # A second session (one session attaches a space once), named NAME-fd.
            fd_session = membroker.connect(name + "-fd", runtime_dir)
            fdc = fd_session.attach_fd(space_id)
            out = "fd"
        elif cmd == "seq":
            assert va is not None
            out = first_touch(va.view(0, va.size))
        elif cmd in ("native_seq", "native_bw"):
            assert fdc is not None
            with mmap.mmap(fdc.fd, fdc.size, mmap.MAP_SHARED) as m:
                view = memoryview(m)
                out = first_touch(view) if cmd == "native_seq" else bandwidth(view)
                view.release()
        elif cmd == "rand":
            assert va is not None
            count, step = int(words[1]), int(words[2])
            view = va.view(0, va.size, check=False)
            pages = random.sample(range(0, va.size // PAGE, step), count)
            samples = []
            for p in pages:
                t0 = time.perf_counter()
                view[p * PAGE]
                samples.append(time.perf_counter() - t0)
            out = samples
        elif cmd == "bw":
            assert va is not None
            out = bandwidth(va.view(0, va.size))
        elif cmd == "memcpy_bw":
            size = va.size if va is not None else 64 << 20
            buf = bytearray(size)
            out = bandwidth(memoryview(buf))
        elif cmd == "write0":
            assert va is not None
            va.write(0, b"w")
            out = "ok"
        else:
            out = f"unknown command {cmd!r}"
        print(json.dumps(out), flush=True)
    session.close()


if __name__ == "__main__":
    main()
