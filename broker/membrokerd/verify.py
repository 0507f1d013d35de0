"""Verification: does a client process still map memory it no longer holds? Asked of the kernel.

Used by the revocation engine after each acknowledgement (`check_revoked`) and by the periodic
audit (`check_holdings`). Both read a `ProcessView` (membroker._sys.proc) of the client: a
targeted PROCMAP_QUERY walk where the client reported its mapping, else one read of
/proc/PID/maps; then /proc/PID/pagemap for the pages that must be gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from membroker._sys.proc import ProcessView, Vma
from membroker.rangeset import RangeSet
from membrokerd.access import Access, AccessRange


def _overlap(vma: Vma, offset: int, end: int) -> tuple[int, int] | None:
    lo, hi = max(offset, vma.offset), min(end, vma.file_end)
    return (lo, hi) if lo < hi else None


def _still_reachable(
    view: ProcessView, vma: Vma, lo: int, hi: int, access: Access, page: int
) -> str | None:
    """What of file range [lo, hi) this mapping still gives beyond `access`, if anything."""
    addr = vma.start + lo - vma.offset
    pages = (hi - lo) // page
    if access is Access.NONE and (vma.readable or vma.writable):
        # Guard markers fault like PROT_NONE without splitting the VMA: fine if every page has one.
        unguarded = view.first_unguarded(addr, pages)
        if unguarded is None:
            return None
        return (
            f"maps offset {lo + unguarded * page:#x} {'writable' if vma.writable else 'readable'}"
            f" ({vma.perms}) at {addr + unguarded * page:#x} with no guard marker"
        )
    if vma.writable and access is not Access.RW:
        return f"maps offsets {lo:#x}-{hi:#x} writable ({vma.perms}) at {addr:#x}"
    if access is Access.NONE:
        present = view.first_present(addr, pages)
        if present is not None:
            return (
                f"still has the page at offset {lo + present * page:#x} present "
                f"(address {addr + present * page:#x})"
            )
    return None


def _targeted(
    view: ProcessView, dev: int, ino: int, base: int, ranges: Sequence[AccessRange], page: int
) -> str | None:
    """Checks the reported mapping at `base`; raises LookupError if it is not what was said."""
    for r in ranges:
        addr, stop = base + r.offset, base + r.offset + r.length
        while addr < stop:
            vma = view.vma_at(addr)
            if (
                vma is None
                or vma.inode != ino
                or vma.dev != dev
                or vma.offset + addr - vma.start != addr - base
            ):
                raise LookupError(addr)
            span = _overlap(vma, addr - base, stop - base)
            assert span is not None
            problem = _still_reachable(view, vma, span[0], span[1], r.access, page)
            if problem:
                return problem
            addr = vma.end
    return None


def check_revoked(
    view: ProcessView,
    dev: int,
    ino: int,
    ranges: Sequence[AccessRange],
    page: int,
    base: int | None = None,
) -> str | None:
    """None when nothing of `ranges` is reachable beyond its new access; else what is.

    With `base` (where the client says it mapped the space), only those addresses are
    examined; if they do not hold the space as reported, every mapping of the file is.
    Other mappings the client may have made are the audit's business.
    """
    if base is not None:
        try:
            return _targeted(view, dev, ino, base, ranges, page)
        except LookupError:
            pass
    vmas = view.mappings_of(dev, ino)
    for r in ranges:
        for vma in vmas:
            span = _overlap(vma, r.offset, r.offset + r.length)
            if span is not None:
                problem = _still_reachable(view, vma, span[0], span[1], r.access, page)
                if problem:
                    return problem
    return None


def check_holdings(
    view: ProcessView, dev: int, ino: int, held: Iterable[AccessRange], page: int
) -> str | None:
    """Full audit: every readable or writable mapping of the file must lie within what the
    client holds (`held`: its effective access). None if so, else the first violation."""
    readable, writable = RangeSet(), RangeSet()
    for r in held:
        readable.add(r.offset // page, (r.offset + r.length) // page)
        if r.access is Access.RW:
            writable.add(r.offset // page, (r.offset + r.length) // page)
    for vma in view.mappings_of(dev, ino):
        first, last = vma.offset // page, -(-vma.file_end // page)
        for needed, allowed, what in (
            (vma.writable, writable, "writable"),
            (vma.readable, readable, "readable"),
        ):
            if not needed:
                continue
            for gs, ge in allowed.missing(first, last):
                # Pages not held are fine where they carry guard markers (they fault on touch).
                addr = vma.start + gs * page - vma.offset
                unguarded = view.first_unguarded(addr, ge - gs)
                if unguarded is not None:
                    return (
                        f"maps offset {(gs + unguarded) * page:#x} {what} ({vma.perms}) at "
                        f"{addr + unguarded * page:#x} without a grant for it"
                    )
    return None
