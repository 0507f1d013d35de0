"""ProcessView follows a process through execve: the files it opened on the old memory image
read as empty afterwards, which must never pass for "maps nothing"."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from membroker._sys import mman
from membroker._sys.libc import PAGE_SIZE
from membroker._sys.memfd import create_memfd
from membroker._sys.proc import PAGE_IS_PRESENT, ProcessView, TooManyMappings

# A program that, at image N > 0, maps the memfd read-write and touches its first page, says
# where, and on "exec" replaces itself with image N + 1 (the memfd's fd inherited).
CHILD = """
import ctypes, mmap, os, sys
fd, image = int(sys.argv[1]), int(sys.argv[2])
if image > 0:
    m = mmap.mmap(fd, 4 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:1] = b"x"
    print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
else:
    print(0, flush=True)
for line in sys.stdin:
    if line.strip() == "exec":
        os.execv(sys.executable, [sys.executable, sys.argv[0], str(fd), str(image + 1)])
    break
"""


class Child:
    def __init__(self, script: Path, fd: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(fd), "0"],
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.address = self._read()

    def _read(self) -> int:
        assert self.proc.stdout is not None
        return int(self.proc.stdout.readline())

    def exec(self) -> int:
        """Replace the program image; the new one's mapping address."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("exec\n")
        self.proc.stdin.flush()
        self.address = self._read()
        return self.address

    def end(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Child, int, os.stat_result]]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    fd = os.memfd_create("exec-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE_SIZE)
    child = Child(script, fd)
    try:
        yield child, fd, os.fstat(fd)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
        child.end()
        os.close(fd)


def test_a_view_follows_the_process_through_execve(world) -> None:
    child, fd, st = world
    view = ProcessView(child.proc.pid)
    try:
        assert view.mappings_of(st.st_dev, st.st_ino) == []  # image 0 maps nothing
        address = child.exec()  # image 1 maps the memfd read-write and touches a page
        (vma,) = view.mappings_of(st.st_dev, st.st_ino)
        assert (vma.start, vma.writable, vma.shared) == (address, True, True)
        assert view.renewals == 1
        # The other questions see the new image too (their files were renewed with the maps).
        found = view.vma_at(address)
        assert found is not None and found.inode == st.st_ino
        assert view.first_present(address, 4) == 0
        assert fd in view.fds_of(st.st_dev, st.st_ino)
        address = child.exec()  # and again: a question other than the maps notices it too
        found = view.vma_at(address)
        assert found is not None and found.inode == st.st_ino and view.renewals == 2
        child.end()  # gone (and reaped): reads fail as they did, nothing is renewed
        with pytest.raises(ProcessLookupError):
            view.mappings_of(st.st_dev, st.st_ino)
        assert view.renewals == 2
    finally:
        view.close()


def test_the_walk_follows_the_process_through_execve_and_agrees_with_the_text(world) -> None:
    """The walk (PROCMAP_QUERY, on the loop) sees what the maps text sees, in the new image
    too; past its limit it stops with TooManyMappings; a process gone is ProcessLookupError."""
    child, _, st = world
    view = ProcessView(child.proc.pid)
    try:
        assert view.walk_mappings_of(st.st_dev, st.st_ino, 4096) == []
        assert view.last_mappings > 0
        address = child.exec()  # a new image that maps the memfd
        (vma,) = view.walk_mappings_of(st.st_dev, st.st_ino, 4096)
        assert (vma.start, vma.writable, vma.shared) == (address, True, True)
        assert view.renewals == 1
        walked = view.last_mappings
        assert view.mappings_of(st.st_dev, st.st_ino) == [vma]
        # Both count every mapping; the text also shows x86_64's [vsyscall] page, which is in
        # no process's VMA tree.
        vsyscall = b"[vsyscall]" in Path(f"/proc/{child.proc.pid}/maps").read_bytes()
        assert view.last_mappings == walked + vsyscall and walked > 3
        with pytest.raises(TooManyMappings) as info:
            view.walk_mappings_of(st.st_dev, st.st_ino, 2)
        assert info.value.limit == 2 and view.last_mappings == 3
        child.end()
        with pytest.raises(ProcessLookupError):
            view.walk_mappings_of(st.st_dev, st.st_ino, 4096)
        assert view.renewals == 1
    finally:
        view.close()


def test_a_process_that_keeps_replacing_itself_is_no_longer_followed(world) -> None:
    child, _, st = world
    view = ProcessView(child.proc.pid)
    try:
        for _ in range(ProcessView.MAX_RENEWALS):
            child.exec()
            assert len(view.mappings_of(st.st_dev, st.st_ino)) == 1
        child.exec()
        with pytest.raises(OSError) as info:
            view.mappings_of(st.st_dev, st.st_ino)
        assert info.value.errno == errno.EAGAIN and "no longer followed" in str(info.value)
    finally:
        view.close()


def test_the_mapping_the_view_reports_is_the_one_in_use(world) -> None:
    """Cross-check against the process's own maps text read afresh by path."""
    child, _, st = world
    view = ProcessView(child.proc.pid)
    try:
        address = child.exec()
        text = Path(f"/proc/{child.proc.pid}/maps").read_text()
        assert f"{address:x}-" in text and f" {st.st_ino} " in text
        assert [v.start for v in view.mappings_of(st.st_dev, st.st_ino)] == [address]
    finally:
        view.close()


def test_file_mappings_in_a_range_are_found_by_procmap_query() -> None:
    """The targeted question: file-backed mappings in an address range, and nothing else."""
    import ctypes
    import mmap

    fd = os.memfd_create("range-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE_SIZE)
    st = os.fstat(fd)
    view = ProcessView(os.getpid())
    anon = mmap.mmap(-1, 4 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem = mmap.mmap(fd, 4 * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(anon))
        assert view.file_mappings_in(address, address + 4 * PAGE_SIZE) == []  # anonymous only
        start = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        found = view.file_mappings_in(start + PAGE_SIZE, start + 2 * PAGE_SIZE)
        assert [(v.start, v.end, v.inode, v.writable) for v in found] == [
            (start, start + 4 * PAGE_SIZE, st.st_ino, True)
        ]
        del found
    finally:
        mem.close()
        anon.close()
        view.close()
        os.close(fd)


# A process with N more mappings: every other page of an anonymous run made read-only.
MANY_MAPPINGS = """
import ctypes, mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, 2 * n * mmap.PAGESIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
start = ctypes.addressof(ctypes.c_char.from_buffer(m))
libc = ctypes.CDLL(None, use_errno=True)
for i in range(n):
    if libc.mprotect(ctypes.c_void_p(start + 2 * i * mmap.PAGESIZE), mmap.PAGESIZE, 1):
        sys.exit(f"mprotect: errno {ctypes.get_errno()}")
print(flush=True)
sys.stdin.read()
"""


def _end(*procs: subprocess.Popen[bytes]) -> None:
    """Kills the processes a test started (by pid) and closes their pipes."""
    for proc in procs:
        proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_a_walk_slowed_by_preemption_alone_does_not_mark_the_process_slow() -> None:
    """Only a walk that slept (waiting for the process's mmap lock) marks the process slow to
    walk. Here the walking thread runs at nice 19 on one CPU with a spinning process, and the
    walk is long (4,000 mappings, a few scheduler slices): it takes far longer than
    SLOW_WALK_S, preempted, and the process is still quick to walk. (On a busy
    2-CPU machine one preemption would otherwise send every later ack of that client to a
    worker thread for good.)"""
    import threading

    n = 4_000
    child = subprocess.Popen(
        [sys.executable, "-c", MANY_MAPPINGS, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", "print(flush=True)\nwhile True: pass"], stdout=subprocess.PIPE
    )
    view = ProcessView(child.pid)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        os.sched_setaffinity(hog.pid, {cpu})
        assert hog.stdout is not None and hog.stdout.readline() == b"\n"  # spinning now
        took: list[float] = []
        go = threading.Event()

        def walk_at_low_priority() -> None:
            os.sched_setaffinity(0, {cpu})  # this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            go.wait()  # until the main thread waits in join(): nothing asks for the GIL
            started = time.monotonic()
            view.walk_mappings_of(1, 1, 4 * n)
            took.append(time.monotonic() - started)

        thread = threading.Thread(target=walk_at_low_priority)
        thread.start()
        go.set()
        thread.join()
        assert view.last_mappings > n
        assert took[0] > ProcessView.SLOW_WALK_S, took  # it was slow: preempted
        assert view.slow_walks == 0 and view.quick_to_walk(4 * n)
    finally:
        _end(hog, child)
        view.close()


def test_a_walk_keeps_the_gil_through_its_ioctls() -> None:
    """The walk runs on the event loop: were each of its ~200 ioctls to release the GIL, a
    worker thread running Python meanwhile would take it, and the walk would wait for it back
    each time (up to the switch interval, per ioctl). Here a thread spins in Python with a
    switch interval of 0.5 s: it runs only while the walking thread gives the GIL up, and its
    counter does not move during a walk of a process of ~60 mappings (a walk that gave the
    GIL up would take ~30 s)."""
    import threading

    n = 16
    child = subprocess.Popen(
        [sys.executable, "-c", MANY_MAPPINGS, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    view = ProcessView(child.pid)
    interval = sys.getswitchinterval()
    spins = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            spins[0] += 1

    spinner = threading.Thread(target=spin)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"\n"
        view.walk_mappings_of(1, 1, 1000)  # files opened, code warm
        sys.setswitchinterval(0.5)
        spinner.start()
        while spins[0] == 0:  # the spinner runs (this thread waits for the GIL meanwhile)
            time.sleep(0)
        before = spins[0]
        view.walk_mappings_of(1, 1, 1000)
        during = spins[0] - before
        seen = view.last_mappings
        time.sleep(0.01)  # gives the GIL up: the spinner counts on
        assert spins[0] > before + during
        assert seen > n
        assert during == 0, f"the spinner ran {during} times during the walk"
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        if spinner.is_alive():
            spinner.join()
        _end(child)
        view.close()


def test_a_scan_with_more_runs_than_its_vectors_finds_every_one() -> None:
    """PAGEMAP_SCAN fills a vector of runs at a time and goes on where it stopped; the vector
    starts small and grows: 1,500 runs come back whole, in order, as pagemap entries say."""
    pages = 3000
    fd = create_memfd("scan-runs", pages * PAGE_SIZE)
    m = mman.Mapping.map_shared(fd, pages * PAGE_SIZE, mman.PROT_READ | mman.PROT_WRITE)
    view = ProcessView(os.getpid())
    try:
        for p in range(0, pages, 2):
            os.pwrite(fd, b"x", p * PAGE_SIZE)
            # Read through the mapping: faults the page in.
            assert ctypes.c_char.from_address(m.address + p * PAGE_SIZE).value == b"x"
        runs = list(view.present_regions(m.address, pages))
        assert runs == [
            (m.address + p * PAGE_SIZE, m.address + (p + 1) * PAGE_SIZE) for p in range(0, pages, 2)
        ]
        assert runs == view._scan_fallback(m.address, pages, PAGE_IS_PRESENT, 0, 0)
        assert next(view.present_regions(m.address + PAGE_SIZE, pages - 1)) == runs[1]
    finally:
        view.close()
        m.close()
        os.close(fd)
