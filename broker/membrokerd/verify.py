"""Verification: what does a client process still reach of a space? The kernel says, we judge.

Used by the revocation engine on every acknowledgement (`check_reach` over the revoked ranges),
by the audit (`check_reach` over the whole space) and after fencing. The judgement is pure: it
reads a `ProcessView` (membroker._sys.proc) and compares every mapping of the space's inode in
that process, wherever the client put it, with what the client may hold now. A client's own
report of where it mapped the space (`Mapped`) is never trusted: a second mapping elsewhere is
found the same way as the first.

A page the client may not read is unreachable when its mapping is PROT_NONE and the page is not
present, or when it carries a guard marker; a page it may not write must not be in a writable
mapping unless guarded. A VA client must not hold an fd of the space at all (it maps once and
closes it); an fd client may.

A sealed mapping (sealed VA mode: the broker registered it with the client's userfaultfd and
serves its faults) is judged by its page table alone, since its protection is read-write or
read-only for good: a page not present is reached only through the broker; a present page is
reachable, and writable unless write-protected (PAGEMAP_SCAN: present, and "written", which
means no uffd-wp bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from membroker._sys import sock as sys_sock
from membroker._sys.proc import ProcessView, Vma
from membroker.rangeset import RangeSet
from membrokerd.access import Access, AccessRange, Runs
from membrokerd.revocation import Verdict


@dataclasses.dataclass(frozen=True, slots=True)
class Allowed:
    """What a client may reach of a space, in pages: `readable` ⊇ `writable`."""

    readable: RangeSet
    writable: RangeSet
    # Start addresses of this process's sealed mappings of the space (served by the broker)
    sealed: frozenset[int] = frozenset()

    @classmethod
    def of(cls, held: Iterable[AccessRange], page: int) -> Allowed:
        readable, writable = RangeSet(), RangeSet()
        for r in held:
            if r.access is Access.NONE:
                continue
            readable.add(r.offset // page, (r.offset + r.length) // page)
            if r.access is Access.RW:
                writable.add(r.offset // page, (r.offset + r.length) // page)
        return cls(readable, writable)

    @classmethod
    def nothing(cls) -> Allowed:
        return cls(RangeSet(), RangeSet())


def _first_outside(
    regions: Iterable[tuple[int, int]],
    vma: Vma,
    examined: RangeSet | None,
    allowed: RangeSet,
    page: int,
) -> int | None:
    """The first file page of the address `regions` (of `vma`) that is examined and not in
    `allowed`, or None."""
    for start, end in regions:
        lo = vma.offset // page + (start - vma.start) // page
        hi = vma.offset // page + (end - vma.start) // page
        spans = examined.intersection(lo, hi) if examined is not None else [(lo, hi)]
        for s, e in spans:
            missing = allowed.first_missing(s, e)
            if missing is not None:
                return missing
    return None


def _asked(vma: Vma, examined: RangeSet | None, page: int) -> tuple[int, int] | None:
    """(address, pages) of the part of `vma` between its first and last examined page; None
    when none of it is examined."""
    first, last = vma.offset // page, -(-vma.file_end // page)
    if examined is not None:
        hull = examined.hull(first, last)
        if hull is None:
            return None
        first, last = hull
    return vma.start + first * page - vma.offset, last - first


def _judge_vma(
    view: ProcessView,
    vma: Vma,
    examined: RangeSet | None,
    allowed: Allowed,
    page: int,
    check_present: bool,
) -> str | None:
    asked = _asked(vma, examined, page)
    if asked is None:
        return None
    addr, pages = asked

    def where(p: int) -> int:
        return vma.start + p * page - vma.offset

    if vma.readable or vma.writable:
        # A page without a guard marker in an accessible mapping is reachable by a touch.
        if vma.writable:
            regions = view.unguarded_regions(addr, pages)
            p = _first_outside(regions, vma, examined, allowed.writable, page)
            if p is not None:
                return (
                    f"maps offset {p * page:#x} writable ({vma.perms}) at {where(p):#x} "
                    "with no guard marker"
                )
        if vma.readable:
            regions = view.unguarded_regions(addr, pages)
            p = _first_outside(regions, vma, examined, allowed.readable, page)
            if p is not None:
                return (
                    f"maps offset {p * page:#x} readable ({vma.perms}) at {where(p):#x} "
                    "with no guard marker"
                )
    elif check_present:
        # PROT_NONE keeps pages mapped until they are zapped (MADV_DONTNEED): still readable
        # through /proc/PID/mem, and one mprotect away from use.
        regions = view.reachable_regions(addr, pages)
        p = _first_outside(regions, vma, examined, allowed.readable, page)
        if p is not None:
            return (
                f"still has the page at offset {p * page:#x} present "
                f"(address {where(p):#x}, {vma.perms})"
            )
    return None


def _judge_sealed(
    view: ProcessView, vma: Vma, examined: RangeSet | None, allowed: Allowed, page: int
) -> str | None:
    asked = _asked(vma, examined, page)
    if asked is None:
        return None
    addr, pages = asked
    if vma.writable:
        p = _first_outside(
            view.writable_regions(addr, pages), vma, examined, allowed.writable, page
        )
        if p is not None:
            return (
                f"has offset {p * page:#x} present and writable at "
                f"{vma.start + p * page - vma.offset:#x} (sealed mapping)"
            )
    p = _first_outside(view.present_regions(addr, pages), vma, examined, allowed.readable, page)
    if p is not None:
        return (
            f"still has the page at offset {p * page:#x} present at "
            f"{vma.start + p * page - vma.offset:#x} (sealed mapping)"
        )
    return None


def check_reach(
    view: ProcessView,
    dev: int,
    ino: int,
    allowed: Allowed,
    page: int,
    ranges: Sequence[AccessRange] | None = None,
    *,
    check_present: bool = True,
    fd_allowed: bool = True,
    walk_limit: int | None = None,
) -> str | None:
    """None when the process reaches nothing of the file (dev, ino) beyond `allowed`; else the
    first thing it does reach, in words.

    `ranges`: only these byte ranges are examined (a revocation's), or the whole file (None:
    an audit). `check_present`: PROT_NONE mappings must not keep pages present there.
    `fd_allowed`: False for a VA client, which may hold no fd of the space. `walk_limit`: the
    mappings are walked with PROCMAP_QUERY, up to that many (TooManyMappings past it), for a
    caller on the event loop; None: read from the maps text (a worker thread). Raises OSError
    when the kernel's view cannot be read (the process exited, or /proc refused).
    """
    if not fd_allowed:
        held = view.fds_of(dev, ino)
        if held:
            return f"holds fd {held[0]} of the space, which it may not"
    examined = None
    if isinstance(ranges, Runs):
        examined = ranges.pages  # already a page set: no range object is made
    elif ranges is not None:
        examined = RangeSet()
        for r in ranges:
            examined.add(r.offset // page, -(-(r.offset + r.length) // page))
    if walk_limit is None:
        mappings = view.mappings_of(dev, ino)
    else:
        mappings = view.walk_mappings_of(dev, ino, walk_limit)
    for vma in mappings:
        if vma.start in allowed.sealed and vma.offset == 0:
            problem = _judge_sealed(view, vma, examined, allowed, page)
        else:
            problem = _judge_vma(view, vma, examined, allowed, page, check_present)
        if problem is not None:
            return problem
    return None


def judge_view(
    view: ProcessView,
    dev: int,
    ino: int,
    allowed: Allowed,
    page: int,
    ranges: Sequence[AccessRange],
    fd_allowed: bool,
    pidfd: int,
    walk_limit: int | None = None,
) -> tuple[Verdict, str]:
    """The verdict on one acknowledgement from the kernel's view (no broker state: may run on
    a worker thread, with `walk_limit` None). A view that cannot be read is `unverified`
    unless the process is gone; TooManyMappings (see `check_reach`) passes through."""
    try:
        problem = check_reach(
            view, dev, ino, allowed, page, ranges, fd_allowed=fd_allowed, walk_limit=walk_limit
        )
    except OSError as exc:
        try:
            alive = sys_sock.pidfd_is_alive(pidfd)
        except OSError:
            alive = False
        if not alive:
            return Verdict.LOST, "the process exited"
        return Verdict.UNVERIFIED, f"its mappings could not be read ({exc})"
    if problem is not None:
        return Verdict.CAUGHT, problem
    return Verdict.ACKED, ""
