"""Compact sets of page numbers, under the daemon's access table and the SDK's held ranges.

A `RangeSet` keeps sorted, disjoint, coalesced half-open intervals ``[start, end)`` in two
``array('Q')`` columns, so a million fragments cost about 16 MB and no page is ever an object::

    starts: [ s0, s1, ... ]     ends: [ e0, e1, ... ]
    invariant: s0 < e0 < s1 < e1 < ...   (strictly: touching intervals are merged)

Lookups bisect the columns; an update costs O(log n + k) plus the move of the arrays' tails.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

__all__ = ["RangeSet"]

Interval = tuple[int, int]

_MAX_PAGE = 2**64 - 1  # the largest value an array('Q') holds
# Batches up to this size go one interval at a time (cheap at the ends of the arrays); larger
# ones in one pass that copies the arrays once.
_SMALL_BATCH = 16


def _check(start: int, end: int) -> None:
    """Raise ValueError unless ``[start, end)`` is a non-empty interval that fits in 64 bits."""
    if not 0 <= start < end <= _MAX_PAGE:
        raise ValueError(f"invalid interval [{start}, {end}): need 0 <= start < end < 2**64")


_SUM_SLICE = 65536  # entries summed per C call in `total`


class RangeSet:
    """A mutable set of page numbers stored as half-open intervals.

    Every method taking ``(start, end)`` requires ``0 <= start < end < 2**64`` and raises
    ValueError otherwise.
    """

    __slots__ = ("_ends", "_starts")

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, intervals: Iterable[Interval] = ()) -> None:
        """Build the union of `intervals` (in any order; they may overlap or touch)."""
        starts: array[int]
        ends: array[int]
        if isinstance(intervals, RangeSet):
            # Already sorted and merged: the columns are copied in C, nothing is re-sorted (a
            # sort of a million intervals holds the GIL for the whole of it).
            starts, ends = intervals.columns()
            self._starts = starts[:]
            self._ends = ends[:]
            return
        starts = array("Q")
        ends = array("Q")
        for start, end in sorted(intervals):
            _check(start, end)
            if ends and start <= ends[-1]:
                if end > ends[-1]:
                    ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    # -- mutation ---------------------------------------------------------------------------

    def add(self, start: int, end: int) -> None:
        """Add the pages ``[start, end)``, merging with every interval it overlaps or touches."""
        _check(start, end)
        starts, ends = self._starts, self._ends
        if not ends or start > ends[-1]:  # fast path: past the last interval
            starts.append(start)
            ends.append(end)
            return
        if start >= starts[-1]:  # fast path: overlaps or touches the last interval only
            if end > ends[-1]:
                ends[-1] = end
            return
        i = bisect_left(ends, start)  # first interval ending at or after `start`
        j = bisect_right(starts, end, i)  # first interval starting after `end`
        if i == j:
            starts.insert(i, start)
            ends.insert(i, end)
            return
        if starts[i] < start:
            start = starts[i]
        if ends[j - 1] > end:
            end = ends[j - 1]
        if j > i + 1:
            del starts[i + 1 : j]
            del ends[i + 1 : j]
        starts[i] = start
        ends[i] = end

    def remove(self, start: int, end: int) -> None:
        """Remove the pages ``[start, end)``, splitting an interval that straddles an edge."""
        starts, ends = self._starts, self._ends
        i, j = self._span(start, end)
        if i == j:
            return
        new_starts: array[int] = array("Q")
        new_ends: array[int] = array("Q")
        if starts[i] < start:
            new_starts.append(starts[i])
            new_ends.append(start)
        if ends[j - 1] > end:
            new_starts.append(end)
            new_ends.append(ends[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends

    def add_many(self, intervals: Iterable[Interval]) -> None:
        """Add many intervals at once, in one pass: untouched stretches of the set are copied
        as array slices, so k intervals into n cost O(k log n) bisections plus one C-level
        copy, instead of k insertions that each move the arrays' tails."""
        batch = RangeSet(intervals)  # sorted, merged, checked
        if not batch:
            return
        if len(batch) <= _SMALL_BATCH:
            # A few intervals: one by one (appending at the end costs O(1) that way).
            for start, end in batch:
                self.add(start, end)
            return
        if not self._starts:
            self._starts, self._ends = batch._starts, batch._ends
            return
        starts, ends = self._starts, self._ends
        out_s: array[int] = array("Q")
        out_e: array[int] = array("Q")
        pos = 0
        for start, end in batch:
            i = bisect_left(ends, start, pos)  # first interval ending at or after `start`
            out_s += starts[pos:i]
            out_e += ends[pos:i]
            j = bisect_right(starts, end, i)  # first interval starting after `end`
            if i < j:
                start = min(start, starts[i])
                end = max(end, ends[j - 1])
            if out_e and out_e[-1] >= start:
                out_e[-1] = max(out_e[-1], end)
            else:
                out_s.append(start)
                out_e.append(end)
            pos = j
        out_s += starts[pos:]
        out_e += ends[pos:]
        self._starts, self._ends = out_s, out_e

    def remove_many(self, intervals: Iterable[Interval]) -> None:
        """Remove many intervals at once, in one pass (see `add_many`)."""
        batch = RangeSet(intervals)
        if not batch or not self._starts:
            return
        if len(batch) <= _SMALL_BATCH:
            for start, end in batch:
                self.remove(start, end)
            return
        starts, ends = self._starts, self._ends
        out_s: array[int] = array("Q")
        out_e: array[int] = array("Q")
        pos = 0
        carry: Interval | None = None  # the part of an interval left after a removal
        for start, end in batch:
            if carry is not None:
                c_start, c_end = carry
                if c_end <= start:
                    out_s.append(c_start)
                    out_e.append(c_end)
                    carry = None
                else:
                    if c_start < start:
                        out_s.append(c_start)
                        out_e.append(start)
                    carry = (end, c_end) if c_end > end else None
                    if carry is not None:
                        continue
            i = bisect_right(ends, start, pos)  # first interval ending after `start`
            out_s += starts[pos:i]
            out_e += ends[pos:i]
            j = bisect_left(starts, end, i)  # first interval starting at or after `end`
            if i < j:
                if starts[i] < start:
                    out_s.append(starts[i])
                    out_e.append(start)
                if ends[j - 1] > end:
                    carry = (end, ends[j - 1])
            pos = max(pos, j)
        if carry is not None:
            out_s.append(carry[0])
            out_e.append(carry[1])
        out_s += starts[pos:]
        out_e += ends[pos:]
        self._starts, self._ends = out_s, out_e

    # -- queries over one interval ----------------------------------------------------------

    def _first_after(self, start: int) -> int:
        """Index of the first interval ending after page `start` (len(self) if none does)."""
        ends = self._ends
        if not ends or start >= ends[-1]:  # fast path: past the last interval
            return len(ends)
        return bisect_right(ends, start)

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Index range ``[i, j)`` of the intervals overlapping ``[start, end)``."""
        _check(start, end)
        i = self._first_after(start)
        return i, bisect_left(self._starts, end, i)  # first interval starting at/after `end`

    def intersection(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are in the set, in order."""
        i, j = self._span(start, end)
        if i == j:
            return []
        if j == i + 1:
            return [(max(self._starts[i], start), min(self._ends[i], end))]
        out = list(zip(self._starts[i:j], self._ends[i:j], strict=True))
        first_start, first_end = out[0]
        if first_start < start:
            out[0] = (start, first_end)
        last_start, last_end = out[-1]
        if last_end > end:
            out[-1] = (last_start, end)
        return out

    def missing(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are not in the set, in order."""
        i, j = self._span(start, end)
        if i == j:
            return [(start, end)]
        out: list[Interval] = []
        pos = start
        for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True):
            if s > pos:
                out.append((pos, s))
            pos = e
        if pos < end:
            out.append((pos, end))
        return out

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any page of ``[start, end)`` is in the set."""
        i, j = self._span(start, end)
        return i < j

    def covers(self, start: int, end: int) -> bool:
        """Whether every page of ``[start, end)`` is in the set."""
        _check(start, end)
        i = self._first_after(start)
        return i < len(self._starts) and self._starts[i] <= start and self._ends[i] >= end

    def first_missing(self, start: int, end: int) -> int | None:
        """The lowest page of ``[start, end)`` not in the set, or None if it is covered."""
        _check(start, end)
        i = self._first_after(start)
        if i < len(self._starts) and self._starts[i] <= start:
            pos: int = self._ends[i]
            return pos if pos < end else None
        return start

    def first_present(self, start: int, end: int) -> int | None:
        """The lowest page of ``[start, end)`` in the set, or None if none is."""
        _check(start, end)
        i = self._first_after(start)
        if i < len(self._starts) and self._starts[i] < end:
            return max(self._starts[i], start)
        return None

    def window(self, start: int, count: int) -> list[Interval]:
        """At most `count` intervals from page `start` on (the first one clipped to start):
        a page of a long listing, costing O(log n + count)."""
        if count <= 0:
            return []
        i = self._first_after(start)
        out = list(zip(self._starts[i : i + count], self._ends[i : i + count], strict=True))
        if out and out[0][0] < start:
            out[0] = (start, out[0][1])
        return out

    def hull(self, start: int, end: int) -> Interval | None:
        """The smallest interval holding every page of the set inside ``[start, end)``, or
        None if there is none."""
        first = self.first_present(start, end)
        if first is None:
            return None
        j = bisect_left(self._starts, end) - 1  # the last interval starting before `end`
        return first, min(self._ends[j], end)

    # -- whole-set operations ---------------------------------------------------------------

    def intersect(self, other: RangeSet) -> RangeSet:
        """A new set holding the pages in both sets.

        Driven by the set with fewer intervals: each of its intervals selects its overlap in the
        other by bisection, copied as array slices (no object per interval), so intersecting a
        million fragments with a few shared ranges costs a few array copies:
        O(min(n, m) log max(n, m)) bisections plus a C-level copy of the output.
        """
        small, large = (self, other) if len(self) <= len(other) else (other, self)
        starts: array[int] = array("Q")
        ends: array[int] = array("Q")
        l_starts, l_ends = large._starts, large._ends
        for start, end in small:
            i, j = large._span(start, end)
            if i == j:
                continue
            first = len(starts)
            starts += l_starts[i:j]
            ends += l_ends[i:j]
            if starts[first] < start:
                starts[first] = start
            if ends[-1] > end:
                ends[-1] = end
        result = RangeSet()
        result._starts = starts
        result._ends = ends
        return result

    @classmethod
    def from_columns(cls, starts: array[int], ends: array[int]) -> RangeSet:
        """A set made of these columns themselves (not copied), which must already be what a
        set holds: sorted, disjoint, not touching, each start below its end. Not checked
        beyond the lengths: for callers that built them that way."""
        if len(starts) != len(ends):
            raise ValueError("starts and ends differ in length")
        result = cls()
        result._starts = starts
        result._ends = ends
        return result

    def columns(self) -> tuple[array[int], array[int]]:
        """The starts and ends columns themselves (read them, never change them)."""
        return self._starts, self._ends

    def total(self) -> int:
        """The number of pages in the set. Summed in slices: one sum() over a million-entry
        column is a C call that holds the GIL (other threads' event loops wait) ~10 ms."""
        starts, ends = self._starts, self._ends
        step = _SUM_SLICE
        return sum(
            sum(ends[i : i + step]) - sum(starts[i : i + step]) for i in range(0, len(ends), step)
        )

    def copy(self) -> RangeSet:
        """An independent copy."""
        result = RangeSet()
        result._starts = self._starts[:]
        result._ends = self._ends[:]
        return result

    def __iter__(self) -> Iterator[Interval]:
        """The intervals ``(start, end)`` in ascending order."""
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        """The number of intervals (fragments), not pages: see `total`."""
        return len(self._starts)

    def __bool__(self) -> bool:
        """Whether the set holds any page."""
        return len(self._starts) > 0

    def __eq__(self, other: object) -> bool:
        """Sets are equal when they hold the same pages."""
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        """``RangeSet([(0, 4), (8, 9)])``."""
        return f"RangeSet({list(self)!r})"
