"""Sealed VA mode: the broker answers every first touch of a client's mapping.

A sealed client hands over a userfaultfd registered (by the broker, `accept`) for missing and
minor faults and write-protection over its whole, sealed mapping of a space. From then on:

- a touch of a page the client holds is mapped in (`UFFDIO_CONTINUE`, a window up to the end of
  the run of equally held pages within the 2 MiB chunk: fault-around), write-protected when the
  client holds it read-only; a hole of the file is allocated first (fallocate of that one page);
  a client faulting in order gets the next windows mapped ahead of it (read-ahead, inside the
  grant), so its first touches cost about what native minor faults cost;
- a touch of a page it does not hold, or a write to one it holds read-only, is refused: the page
  is poisoned (the touch is a SIGBUS) or, where a marker is already there, the process gets
  SIGBUS through its pidfd;
- write access taken away is write-protected in the client by the broker, at once, without the
  client's help (`lower_write`); a read revoke stays cooperative (the client zaps, the broker
  verifies) and takes the pages out of what may fault in when the client acknowledges
  (`set_access`), so its access() blocks still read safely until then; a refault after that is
  refused.

Faults are served on one thread of their own (epoll over every uffd), never behind gRPC work on
the event loop. Each mapping's access is a pair of page sets under a lock that the loop takes to
change them, so a fault is decided against either the old or the new access, never half of one;
a write-protection and a fault-in of the same page cannot interleave.

A sealed mapping cannot be unmapped by the client, and closing its uffd would hand the client
the whole file: so a mapping whose session ends stays served, inert (every touch refused,
everything write-protected), until the process exits (its pidfd says so).

Kernel facts this stands on, measured on 6.18 (tests/sys/test_uffd.py checks them):
- The uffd ioctls act on the address space of the uffd's creator, whoever calls them: the broker
  registers the client's range itself, after the client sealed it (mseal does not stop a
  registration). A second registration from another uffd of the same process is EBUSY.
- Registration needs VM_MAYWRITE: a mapping of an O_RDONLY description is refused (EPERM), so a
  read-only sealed client maps an O_RDWR fd PROT_READ; the seal keeps it read-only.
- MINOR faults only see pages already in the page cache: a hole of the file faults as MISSING
  (registered too), or the kernel would allocate it without asking.
- UFFDIO_CONTINUE stops at the first page it cannot map (EEXIST when present, EFAULT for a
  hole) and reports how far it got; the window must stay inside the VMA.
- UFFDIO_POISON refuses a page-table entry that holds a uffd-wp marker (EEXIST): then the
  refusal is a SIGBUS sent through the pidfd.
- A second uffd of the client's own can UFFDIO_CONTINUE pages of a range registered to the
  broker's (the kernel checks that the range is registered, not with which uffd): a client
  holding one is refused at sealing; one made later is caught by verification and audits.
- A guest_memfd mapping cannot be registered (EINVAL): such spaces attach cooperatively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable

from membroker._sys import sock as sys_sock
from membroker._sys import uffd as sys_uffd
from membroker._sys.proc import ProcessView
from membroker._sys.uffd import Fault, Uffd
from membroker.rangeset import RangeSet
from membrokerd.access import Access, AccessRange, LevelRuns, Runs

log = logging.getLogger("membrokerd.faults")

# Fault-around: at most this much is mapped per fault, within one aligned chunk.
WINDOW_BYTES = 2 << 20
# Write-protecting more lowered ranges than this one by one costs more than protecting their
# hull: pages of the hull still writable are released again lazily, on their next write fault.
WP_RANGES = 64
# A client faulting in order gets up to this many windows mapped ahead of it (it works on one
# window while the broker maps the next: the round trips overlap its own work).
READ_AHEAD_WINDOWS = 4
# A process refused this many times (it catches SIGBUS and touches again) is killed.
REFUSALS_BEFORE_KILL = 16


@dataclasses.dataclass(slots=True)
class FaultStats:
    """What the fault server did (read from other threads: plain counters)."""

    mapped: int = 0
    refused: int = 0
    write_released: int = 0
    read_ahead: int = 0


class SealedMapping:
    """One sealed mapping of a space in a client process, and the access it may fault in."""

    def __init__(
        self,
        uffd: Uffd,
        space_fd: int,
        space_id: str,
        client: str,
        session_id: str,
        pid: int,
        pidfd: int,
        base: int,
        length: int,
        page: int,
        *,
        inert: bool = False,
        view: ProcessView | None = None,
    ) -> None:
        self.uffd = uffd
        # The client's page table (owned): which pages a write-protection must reach.
        self.view = view
        self.space_fd = space_fd  # the broker's own fd of the space (not owned)
        self.space_id = space_id
        self.client = client
        self.session_id = session_id
        self.pid = pid
        self.pidfd = pidfd  # owned (a dup), or -1 for a forked child's copy
        self.base = base
        self.length = length
        self.page = page
        self.lock = threading.Lock()
        self.readable = RangeSet()
        self.writable = RangeSet()
        self.inert = inert
        # Closed (its process exited): every method is a no-op. Set under the lock, so no
        # ioctl ever reaches a closed (or reused) fd number.
        self.closed = False
        self.refusals = 0
        self.killed = False
        self.chunk_pages = max(1, WINDOW_BYTES // page)
        # Sequential fault detection: where the next fault lands if the client goes on in
        # order, and how many windows to map ahead of it (doubling up to READ_AHEAD_WINDOWS).
        self._ahead_from = -1
        self._ahead = 1

    def __repr__(self) -> str:
        return (
            f"<SealedMapping {self.space_id} {self.client!r} pid={self.pid} "
            f"at {self.base:#x}{' inert' if self.inert else ''}>"
        )

    # -- called by the broker, on the event loop -----------------------------------------------

    def set_access(self, ranges: Iterable[AccessRange]) -> None:
        """The client's access over `ranges` (disjoint) is now as given. Write access taken
        away is write-protected in the client before this returns (without its help)."""
        levels = self._levels(ranges)
        with self.lock:
            if self.closed:
                return
            for level, pages in levels.items():
                if level is Access.RW:
                    self.readable.add_many(pages)
                    self.writable.add_many(pages)
                    continue
                self._lose_write(pages)
                if level is Access.RO:
                    self.readable.add_many(pages)
                else:
                    self.readable.remove_many(pages)

    def lower_write(self, ranges: Iterable[AccessRange]) -> None:
        """Write access over `ranges` is gone (whatever is left of read access): write-protect
        them in the client now. Read access is taken later, with `set_access`, when the client
        has zapped and acknowledged (until then its access() blocks may still fault pages in)."""
        levels = self._levels(ranges)
        with self.lock:
            if self.closed:
                return
            for pages in levels.values():
                self._lose_write(pages)

    def _levels(self, ranges: Iterable[AccessRange]) -> dict[Access, RangeSet]:
        """`ranges` as a page set per access level (runs already are one: no object per run)."""
        if isinstance(ranges, Runs):
            return {ranges.level: ranges.pages}
        if isinstance(ranges, LevelRuns):
            return ranges.page_sets()
        page = self.page
        spans: dict[Access, list[tuple[int, int]]] = {}
        for r in ranges:
            spans.setdefault(r.access, []).append(
                (r.offset // page, -(-(r.offset + r.length) // page))
            )
        return {level: RangeSet(found) for level, found in spans.items()}

    def _lose_write(self, pages: RangeSet) -> None:
        """Under the lock: `pages` are no longer writable; what was is write-protected."""
        lost = self.writable.intersect(pages)
        if lost:
            self.writable.remove_many(pages)
            self._write_protect(lost)

    def reset(self, readable: RangeSet, writable: RangeSet) -> None:
        """The client's whole access, as page sets (at acceptance: nothing is mapped yet)."""
        with self.lock:
            self.readable = readable.copy()
            self.writable = writable.copy()

    def retire(self) -> None:
        """The session let go of the mapping: every touch is refused from now on, and nothing
        in it stays writable. Never raises (it runs while a session is torn down)."""
        with self.lock:
            self.inert = True
            self.readable = RangeSet()
            self.writable = RangeSet()
            if self.closed:
                return
            try:
                self._write_protect(RangeSet([(0, self.length // self.page)]))
            except OSError as exc:
                log.error("%r: write-protecting it on retirement failed: %s", self, exc)

    def _write_protect(self, spans: RangeSet) -> None:
        """Write-protects what is present and writable in `spans` (pages). Only present pages
        need it: any other touch is a fault this broker answers from the new access. Their
        runs come from one PAGEMAP_SCAN over the spans' hull, so protecting a million
        fragments costs what the client actually has mapped (a range-wide write-protect of
        shmem would install a marker in every page-table entry of it)."""
        if not spans:
            return
        # Never list() a large set: one C call that builds a tuple per run holds the GIL
        # throughout (67 ms for 500,000 runs, all of it an event-loop stall).
        starts, ends = spans.columns()
        lo, hi = starts[0], ends[-1]
        targets: list[tuple[int, int]] = []
        if self.view is not None:
            try:
                for start, end in self.view.writable_regions(self.base + lo * self.page, hi - lo):
                    first = (start - self.base) // self.page
                    last = (end - self.base) // self.page
                    targets.append((first, last))
            except OSError:
                targets = []
                self.view.close()  # the process is exiting: whole spans from now on
                self.view = None
        if self.view is None:
            targets = list(spans) if len(spans) <= WP_RANGES else [(lo, hi)]
        for first, last in targets:
            for attempt in range(100):
                try:
                    self.uffd.writeprotect(
                        self.base + first * self.page, (last - first) * self.page
                    )
                    break
                except OSError as exc:
                    if exc.errno in (errno.ESRCH, errno.ENOENT):
                        return  # the process is gone, its address space with it
                    if exc.errno != errno.EAGAIN or attempt == 99:
                        raise
                    # The client's address space is changing (a fork, say): again.
                    time.sleep(0.0005)

    def held(self) -> tuple[RangeSet, RangeSet]:
        with self.lock:
            return self.readable.copy(), self.writable.copy()

    # -- called on the fault thread ------------------------------------------------------------

    def serve(self, fault: Fault, stats: FaultStats) -> str | None:
        """Answers one fault; returns why it was refused, or None."""
        page = self.page
        index = (fault.address - self.base) // page
        if not 0 <= index < self.length // page:
            return f"fault at {fault.address:#x}, outside the mapping"
        with self.lock:
            if self.closed:
                return None
            if self.inert:
                return self._refuse(index, "touched a mapping it no longer holds", fault.tid)
            if not self.readable.covers(index, index + 1):
                return self._refuse(
                    index, f"touched offset {index * page:#x}, which it does not hold"
                )
            rw = self.writable.covers(index, index + 1)
            if (fault.write or fault.wp) and not rw:
                return self._refuse(
                    index, f"wrote offset {index * page:#x}, which it holds read-only"
                )
            end = self._run_end(index, rw)
            addr = self.base + index * page
            try:
                if fault.wp:
                    # A write to a present page protected earlier: it is writable now.
                    self.uffd.writeprotect(addr, (end - index) * page, protect=False)
                    stats.write_released += 1
                    return None
                return self._map_in(index, end, rw, missing=not fault.minor, stats=stats)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    return None  # the process is exiting
                # Never leave the faulting thread waiting on an answer that will not come.
                return self._refuse(
                    index, f"offset {index * page:#x} could not be mapped in ({exc})", fault.tid
                )

    def _run_end(self, index: int, rw: bool) -> int:
        """End of the run from `index` of pages held exactly like it, within its chunk."""
        cp = self.chunk_pages
        limit = min(self.length // self.page, (index // cp + 1) * cp)
        held = self.writable if rw else self.readable
        run = held.window(index, 1)
        end = min(run[0][1], limit) if run else index + 1
        if not rw:
            first_rw = self.writable.first_present(index, end)
            if first_rw is not None:
                end = first_rw
        return max(end, index + 1)

    def _map_in(
        self, index: int, end: int, rw: bool, *, missing: bool, stats: FaultStats
    ) -> str | None:
        page = self.page
        addr = self.base + index * page
        for attempt in range(2):
            if missing or attempt:
                # A hole: allocate that one page in the file (zeroes), then map it like any
                # other. Only the touched page: fault-around never allocates.
                with contextlib.suppress(OSError):
                    os.posix_fallocate(self.space_fd, index * page, page)
            try:
                done = self.uffd.continue_(addr, (end - index) * page, wp=not rw)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    # Mapped meanwhile (another thread of the client faulted it): wake it.
                    with contextlib.suppress(OSError):
                        self.uffd.wake(addr, page)
                    return None
                if exc.errno in (errno.EFAULT, errno.ENOENT) and not attempt:
                    end = index + 1  # a hole inside the window, or the page itself
                    continue
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    return None  # the process is exiting
                raise
            stats.mapped += 1
            mapped_end = index + max(1, done // page)
            if index == self._ahead_from:
                # Sequential: the client is already woken and works on this window; map the
                # next ones meanwhile (each inside the grant, held alike), more each time.
                self._ahead = min(READ_AHEAD_WINDOWS, self._ahead * 2)
                self._read_ahead(mapped_end, stats)
            else:
                self._ahead = 1
                self._ahead_from = mapped_end
            return None
        return None

    def _read_ahead(self, start: int, stats: FaultStats) -> None:
        total = self.length // self.page
        for _ in range(self._ahead):
            if start >= total or not self.readable.covers(start, start + 1):
                break
            rw = self.writable.covers(start, start + 1)
            end = self._run_end(start, rw)
            try:
                done = self.uffd.continue_(
                    self.base + start * self.page, (end - start) * self.page, wp=not rw
                )
            except OSError:
                break  # present already, or a hole: the client's own fault will tell
            stats.read_ahead += 1
            start += max(1, done // self.page)
        self._ahead_from = start

    def _refuse(self, index: int, why: str, tid: int = 0) -> str:
        """Makes the touch a SIGBUS: a poison marker where the page table has room for one,
        else the signal through the pidfd (a process that keeps catching it is killed)."""
        self.refusals += 1
        addr = self.base + index * self.page
        try:
            self.uffd.poison(addr, self.page)
            return why
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.EINVAL):
                if exc.errno in (errno.ESRCH, errno.ENOENT):
                    return why
                raise
        if self.pidfd < 0 and tid > 0:
            # A forked child's copy: the faulting thread names the process (a fork's first
            # thread is its leader); it is killed.
            with contextlib.suppress(OSError):
                pidfd = sys_sock.pidfd_open(tid)
                try:
                    sys_sock.pidfd_send_signal(pidfd, signal.SIGKILL)
                finally:
                    os.close(pidfd)
            return why + f" (a forked child, pid {tid}: killed)"
        if self.pidfd < 0:
            return why
        sig = signal.SIGKILL if self.refusals > REFUSALS_BEFORE_KILL else signal.SIGBUS
        with contextlib.suppress(OSError):
            sys_sock.pidfd_send_signal(self.pidfd, sig)
        if sig == signal.SIGKILL:
            self.killed = True
        return why

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.uffd.close()
            if self.view is not None:
                self.view.close()
                self.view = None
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1


Refused = Callable[[SealedMapping, str], None]


class FaultServer:
    """The thread that serves every sealed mapping's faults (one epoll over their uffds)."""

    def __init__(self, on_refused: Refused, observe: Callable[[float], None] | None = None) -> None:
        self.stats = FaultStats()
        self._on_refused = on_refused
        self.observe = observe
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._by_fd: dict[int, SealedMapping] = {}
        self._by_pidfd: dict[int, list[SealedMapping]] = {}
        self.mappings: list[SealedMapping] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="membrokerd-faults", daemon=True)
        self._thread.start()

    def add(self, mapping: SealedMapping) -> None:
        with self._lock:
            self.mappings.append(mapping)
            self._by_fd[mapping.uffd.fd] = mapping
            self._epoll.register(mapping.uffd.fd, select.EPOLLIN)
            if mapping.pidfd >= 0:
                watchers = self._by_pidfd.setdefault(mapping.pidfd, [])
                watchers.append(mapping)
                self._epoll.register(mapping.pidfd, select.EPOLLIN)

    def of_process(self, pid: int, space_id: str) -> list[SealedMapping]:
        with self._lock:
            return [m for m in self.mappings if m.pid == pid and m.space_id == space_id]

    def _remove(self, mapping: SealedMapping) -> None:
        """On the fault thread only (so no fault of it is being served meanwhile)."""
        with self._lock:
            if mapping not in self.mappings:
                return
            self.mappings.remove(mapping)
            self._by_fd.pop(mapping.uffd.fd, None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(mapping.uffd.fd)
            if mapping.pidfd >= 0:
                self._by_pidfd.pop(mapping.pidfd, None)
                with contextlib.suppress(OSError):
                    self._epoll.unregister(mapping.pidfd)
        mapping.close()

    def close(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=5)
        for mapping in list(self.mappings):
            mapping.close()
        self.mappings.clear()
        self._epoll.close()
        os.close(self._wake)

    def _run(self) -> None:
        while not self._stopping:
            try:
                ready = self._epoll.poll(1.0)
            except InterruptedError:
                continue
            for fd, _mask in ready:
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                with self._lock:
                    mapping = self._by_fd.get(fd)
                    exited = self._by_pidfd.get(fd)
                if exited is not None:
                    for m in list(exited):
                        self._remove(m)
                    continue
                if mapping is not None:
                    self._drain(mapping)

    def _drain(self, mapping: SealedMapping) -> None:
        try:
            faults = mapping.uffd.read_events()
        except OSError as exc:
            log.warning("%r: reading its faults failed (%s); it is dropped", mapping, exc)
            self._remove(mapping)
            return
        for fault in faults:
            if fault.event == sys_uffd.EVENT_FORK:
                self._forked(mapping, fault.child_fd)
                continue
            if fault.event != sys_uffd.EVENT_PAGEFAULT:
                continue
            t0 = time.perf_counter_ns()
            try:
                why = mapping.serve(fault, self.stats)
            except OSError as exc:
                why = f"its fault at {fault.address:#x} could not be served ({exc})"
                log.error("%r: %s", mapping, why)
            if self.observe is not None:
                self.observe((time.perf_counter_ns() - t0) / 1e9)
            if why is not None:
                self.stats.refused += 1
                self._on_refused(mapping, why)

    def _forked(self, parent: SealedMapping, child_fd: int) -> None:
        """The client forked with its mapping (it had undone MADV_DONTFORK). The child's copy is
        served too, inert (nothing writable, every touch refused), and the child is killed:
        pages present in the parent at the fork were copied into it, and no revocation reaches
        a process that holds no session. Its first fault names it; so does a look at the
        parent's children a moment later (it is not linked to its parent before this event is
        read)."""
        child = SealedMapping(
            Uffd(child_fd),
            parent.space_fd,
            parent.space_id,
            parent.client + " (forked child)",
            parent.session_id,
            0,
            -1,
            parent.base,
            parent.length,
            parent.page,
            inert=True,
        )
        with contextlib.suppress(OSError):
            child.retire()
        self.add(child)
        self._on_refused(child, "forked with its sealed mapping: the child is killed")
        timer = threading.Timer(0.05, _kill_forked_children, (parent,))
        timer.daemon = True
        timer.start()


def _kill_forked_children(parent: SealedMapping) -> None:
    """SIGKILL every child of the client's process that maps the sealed range."""
    try:
        tids = os.listdir(f"/proc/{parent.pid}/task")
    except OSError:
        return
    children: set[int] = set()
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{parent.pid}/task/{tid}/children") as f:
            children.update(int(x) for x in f.read().split())
    want = f"{parent.base:x}-{parent.base + parent.length:x} "
    for pid in children:
        try:
            pidfd = sys_sock.pidfd_open(pid)
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.startswith(want) for line in f):
                    sys_sock.pidfd_send_signal(pidfd, signal.SIGKILL)
                    log.warning(
                        "killed pid %d: a fork of %r that inherited its sealed mapping",
                        pid,
                        parent.client,
                    )
        except OSError:
            pass
        finally:
            os.close(pidfd)
