"""Samples /proc/PID/maps of a process in a tight loop, in its own process at real-time
priority where allowed (so that the processes it watches do not keep it off the CPU), and
keeps what each read showed of one file (by inode) as file ranges.

    maps_sampler.py PID INODE   -- prints "ready" after the first read; samples until a line
    arrives on stdin, then prints one JSON line: [[monotonic time, [[start, end], ...]], ...]
"""

from __future__ import annotations

import json
import os
import select
import sys
import time


def read_spans(fd: int, ino: int) -> list[tuple[int, int]]:
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    spans = []
    for line in b"".join(chunks).split(b"\n"):
        fields = line.split()
        if len(fields) >= 5 and int(fields[4]) == ino:
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            offset = int(fields[2], 16)
            spans.append((offset, offset + end - start))
    return sorted(spans)


def main() -> None:
    pid, ino = int(sys.argv[1]), int(sys.argv[2])
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (PermissionError, OSError):
        pass
    fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY)
    samples = [(time.monotonic(), read_spans(fd, ino))]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    poller = select.poll()
    poller.register(sys.stdin, select.POLLIN)
    while not poller.poll(0):
        samples.append((time.monotonic(), read_spans(fd, ino)))
    samples.append((time.monotonic(), read_spans(fd, ino)))
    sys.stdout.write(json.dumps(samples) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
