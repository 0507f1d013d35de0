"""How a VaClient's mapping is protected: a plan from what it holds, cheap in VMAs.

Used by `VaClient`. Every change of what the client holds re-plans the 2 MiB chunks it touches:

- a chunk where nothing is held stays PROT_NONE (no page tables, no VMA split);
- a chunk where something is held gets the widest protection held in it (rw, else r), the
  held pages with less access inside it are mprotected down (read-only needs a VMA of its own),
  and every page NOT held inside it gets a guard marker (MADV_GUARD_INSTALL): a fault on touch
  like PROT_NONE, but without splitting the VMA. So an every-other-page pattern costs one VMA,
  not one per fragment (vm.max_map_count is 65530).

Without guard markers (kernels before 6.13), not-held pages are mprotected PROT_NONE instead:
correct, but one VMA per fragment.
"""

from __future__ import annotations

import dataclasses

from membroker.rangeset import RangeSet

PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
CHUNK_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Desired protection of pages [first, last): `runs` of (start, end, prot) covering the
    whole interval, the pages that must carry a guard marker and those that must not."""

    runs: tuple[tuple[int, int, int], ...]
    guard: RangeSet
    unguard: RangeSet


def plan(
    readable: RangeSet,
    writable: RangeSet,
    first: int,
    last: int,
    chunk_pages: int,
    total_pages: int,
    guards: bool = True,
) -> Plan:
    """The plan for every chunk touching pages [first, last)."""
    c0 = first // chunk_pages * chunk_pages
    c1 = min(total_pages, -(-last // chunk_pages) * chunk_pages)
    runs: list[tuple[int, int, int]] = []
    guard, unguard = RangeSet(), RangeSet()

    def add(start: int, end: int, prot: int) -> None:
        if runs and runs[-1][1] == start and runs[-1][2] == prot:
            runs[-1] = (runs[-1][0], end, prot)
        else:
            runs.append((start, end, prot))

    for cs in range(c0, c1, chunk_pages):
        ce = min(cs + chunk_pages, total_pages)
        held = readable.intersection(cs, ce)
        if not held:
            add(cs, ce, PROT_NONE)
            continue
        chunk_prot = PROT_RW if writable.overlaps(cs, ce) else PROT_READ
        cursor = cs
        for hs, he in held:
            if cursor < hs:
                add(cursor, hs, chunk_prot if guards else PROT_NONE)
                if guards:
                    guard.add(cursor, hs)
            pos = hs
            for ws, we in writable.intersection(hs, he):
                if pos < ws:
                    add(pos, ws, PROT_READ)
                add(ws, we, PROT_RW)
                pos = we
            if pos < he:
                add(pos, he, PROT_READ)
            unguard.add(hs, he)
            cursor = he
        if cursor < ce:
            add(cursor, ce, chunk_prot if guards else PROT_NONE)
            if guards:
                guard.add(cursor, ce)
    return Plan(tuple(runs), guard, unguard)
