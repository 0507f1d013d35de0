"""Compact sets of page numbers, under the daemon's access table and the SDK's held ranges.

A `RangeSet` keeps sorted, disjoint, coalesced half-open intervals ``[start, end)`` in
``array('Q')`` columns cut into chunks of about a thousand intervals, so a million fragments
cost about 16 MB, no page is ever an object, and a change in the middle moves one chunk's tail,
not half of a 16 MB array::

    chunk k:  starts: [ s0, s1, ... ]     ends: [ e0, e1, ... ]
    invariant, across all chunks in order: s0 < e0 < s1 < e1 < ...   (touching intervals merge)

Lookups bisect the chunks' bounds, then one chunk: O(log n). A change to one interval costs
O(log n) plus the copy of the one or two chunks it touches; a batch larger than the set's
number of chunks is applied in one pass over whole columns (`add_many`, `remove_many`). A copy
shares the chunks (copy on write): O(chunks), so a table can compute a change on a copy of a
million-fragment client's sets and keep or drop it.
"""

from __future__ import annotations

import itertools
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["PAIRWISE_MAX", "RangeSet", "shared_batch", "touching"]

T = TypeVar("T")
Interval = tuple[int, int]
Columns = tuple["array[int]", "array[int]"]

_MAX_PAGE = 2**64 - 1  # the largest value an array('Q') holds
# Batches up to this size go one interval at a time; larger ones (and any batch with more
# intervals than the set has chunks) in one pass over whole columns.
_SMALL_BATCH = 16
# Intervals per chunk: chunks are cut to this size and hold up to twice it before they split;
# one that falls under half of it is merged with a neighbour. A chunk of 1,024 intervals is
# 16 KiB of columns: an insertion moves at most that much.
_LOAD = 1024


def _check(start: int, end: int) -> None:
    """Raise ValueError unless ``[start, end)`` is a non-empty interval that fits in 64 bits."""
    if not 0 <= start < end <= _MAX_PAGE:
        raise ValueError(f"invalid interval [{start}, {end}): need 0 <= start < end < 2**64")


# -- the flat algorithms, on one pair of sorted columns ---------------------------------------


def _few(intervals: Iterable[Interval]) -> bool:
    """Whether a batch is a list or tuple of at most _SMALL_BATCH intervals: applied one at a
    time, without a set made of it first."""
    return type(intervals) in (list, tuple) and len(intervals) <= _SMALL_BATCH  # type: ignore[arg-type]


def shared_batch(intervals: list[Interval]) -> list[Interval] | RangeSet:
    """A batch to apply to several sets (`add_many`, `remove_many`): a large one sorted and
    merged once, as a RangeSet (each set then copies its chunk lists, not its intervals); a
    small one as it is, which each set applies an interval at a time without making a set."""
    return intervals if len(intervals) <= _SMALL_BATCH else RangeSet(intervals)


# Up to this many (item, interval) pairs, `touching` compares each item with each interval;
# past it, it looks each item up in one set of the intervals.
PAIRWISE_MAX = 4096


def touching(
    items: Iterable[T], span_of: Callable[[T], Interval], intervals: Sequence[Interval]
) -> list[T]:
    """The items (in their order) whose span ``[start, end)`` (`span_of`) overlaps one of the
    `intervals` ``[start, end)``, any order; empty spans and intervals overlap nothing. Few
    pairs are compared each with each; many (thousands of pins against a revocation of
    thousands of ranges) go through one RangeSet of the intervals, a bisection per item."""
    items = list(items)
    wide = [iv for iv in intervals if iv[0] < iv[1]]
    if not items or not wide:
        return []
    if len(items) * len(wide) <= PAIRWISE_MAX:
        out = []
        for item in items:
            start, end = span_of(item)
            if start < end and any(lo < end and start < hi for lo, hi in wide):
                out.append(item)
        return out
    within = RangeSet(wide)
    out = []
    for item in items:
        start, end = span_of(item)
        if start < end and within.overlaps(start, end):
            out.append(item)
    return out


def _flat_add(starts: array[int], ends: array[int], start: int, end: int) -> None:
    """Add ``[start, end)`` to the columns in place, merging what it overlaps or touches."""
    if not ends or start > ends[-1]:  # past the last interval
        starts.append(start)
        ends.append(end)
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


def _flat_remove(starts: array[int], ends: array[int], start: int, end: int) -> None:
    """Remove ``[start, end)`` from the columns in place, splitting a straddling interval."""
    i = bisect_right(ends, start)  # first interval ending after `start`
    j = bisect_left(starts, end, i)  # first interval starting at or after `end`
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


def _flat_add_many(starts: array[int], ends: array[int], batch: Iterable[Interval]) -> Columns:
    """New columns: the union of the columns and a sorted, merged `batch`, in one pass:
    untouched stretches are copied as array slices."""
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
    return out_s, out_e


def _flat_remove_many(starts: array[int], ends: array[int], batch: Iterable[Interval]) -> Columns:
    """New columns: the columns less a sorted, merged `batch`, in one pass."""
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
    return out_s, out_e


def _flat_intersect(starts: array[int], ends: array[int], batch: Iterable[Interval]) -> Columns:
    """New columns: the parts of the columns inside a sorted, merged `batch`, in one pass of
    bisections, each overlap copied as array slices."""
    out_s: array[int] = array("Q")
    out_e: array[int] = array("Q")
    pos = 0
    for start, end in batch:
        i = bisect_right(ends, start, pos)  # first interval ending after `start`
        j = bisect_left(starts, end, i)  # first interval starting at or after `end`
        pos = i  # the next interval of the batch starts later: nothing before i concerns it
        if i == j:
            continue
        first = len(out_s)
        out_s += starts[i:j]
        out_e += ends[i:j]
        if out_s[first] < start:
            out_s[first] = start
        if out_e[-1] > end:
            out_e[-1] = end
    return out_s, out_e


def _concat(parts: Iterable[array[int]]) -> array[int]:
    """One array of `parts` in order (a C-level copy per part: the GIL is let go between)."""
    out: array[int] = array("Q")
    for part in parts:
        out += part
    return out


class _Builder:
    """Makes a set from sorted pieces of columns (valid, apart from each other), taking a
    piece of chunk size as a chunk as it is (no copy) and gathering small ones."""

    __slots__ = ("_ce", "_cs", "_pe", "_ps")

    def __init__(self) -> None:
        self._cs: list[array[int]] = []
        self._ce: list[array[int]] = []
        self._ps: array[int] = array("Q")
        self._pe: array[int] = array("Q")

    def add(self, starts: array[int], ends: array[int]) -> None:
        """Append a piece this builder may keep (the caller no longer uses it), of at most
        twice the chunk size (a slice of one chunk)."""
        if len(self._ps) + len(starts) > 2 * _LOAD:
            self._flush()
        if len(starts) >= _LOAD // 2 and not self._ps:
            self._cs.append(starts)
            self._ce.append(ends)
            return
        self._ps += starts
        self._pe += ends
        if len(self._ps) >= _LOAD:
            self._flush()

    def _flush(self) -> None:
        if self._ps:
            self._cs.append(self._ps)
            self._ce.append(self._pe)
            self._ps, self._pe = array("Q"), array("Q")

    def build(self) -> RangeSet:
        self._flush()
        result = RangeSet()
        if len(self._cs) == 1:  # one chunk: it may be of any size
            result._set_columns(self._cs[0], self._ce[0])
            return result
        result._cs, result._ce = self._cs, self._ce
        result._first = [c[0] for c in self._cs]
        result._last = [c[-1] for c in self._ce]
        result._len = sum(len(c) for c in self._cs)
        return result


class RangeSet:
    """A mutable set of page numbers stored as half-open intervals.

    Every method taking ``(start, end)`` requires ``0 <= start < end < 2**64`` and raises
    ValueError otherwise.
    """

    # _cs/_ce: the chunks' starts and ends columns (never empty); _first/_last: each chunk's
    # first start and last end, bisected to find a chunk; _len: the intervals in all chunks.
    # Chunk arrays are shared between copies and never changed in place, but for one case:
    # appending past the end of the last chunk, which `_own_last` says is this set's alone.
    __slots__ = ("_ce", "_cs", "_first", "_last", "_len", "_own_last")

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, intervals: Iterable[Interval] = ()) -> None:
        """Build the union of `intervals` (in any order; they may overlap or touch)."""
        self._cs: list[array[int]] = []
        self._ce: list[array[int]] = []
        self._first: list[int] = []
        self._last: list[int] = []
        self._len = 0
        self._own_last = True
        if type(intervals) is tuple and not intervals:  # RangeSet(): nothing to sort
            return
        if isinstance(intervals, RangeSet):
            # Already sorted and merged: the chunks are shared (copy on write: a change makes
            # new arrays for what it touches), so a copy of a million fragments costs two lists
            # of a thousand references, and nothing is re-sorted.
            self._cs = intervals._cs[:]
            self._ce = intervals._ce[:]
            self._first = intervals._first[:]
            self._last = intervals._last[:]
            self._len = intervals._len
            self._own_last = intervals._own_last = False
            return
        if type(intervals) in (list, tuple) and len(intervals) == 1:  # type: ignore[arg-type]
            # One interval (a single range's batch): no sort, no merge.
            ((start, end),) = intervals
            _check(start, end)
            self._set_columns(array("Q", (start,)), array("Q", (end,)))
            return
        starts: array[int] = array("Q")
        ends: array[int] = array("Q")
        for start, end in sorted(intervals):
            _check(start, end)
            if ends and start <= ends[-1]:
                if end > ends[-1]:
                    ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        self._set_columns(starts, ends)

    # -- chunk bookkeeping ------------------------------------------------------------------

    def _set_columns(self, starts: array[int], ends: array[int]) -> None:
        """Make the set these (valid) columns, cut into chunks."""
        n = len(starts)
        if n <= 2 * _LOAD:  # one chunk, or none
            self._cs, self._ce = ([starts], [ends]) if n else ([], [])
            self._first = [starts[0]] if n else []
            self._last = [ends[-1]] if n else []
            self._len = n
            self._own_last = n > 0
            return
        self._cs, self._ce = [], []
        self._first, self._last = [], []
        self._len = 0
        self._splice(0, 0, starts, ends)

    def _splice(self, k0: int, k1: int, starts: array[int], ends: array[int]) -> None:
        """Replace chunks ``[k0, k1)`` by these columns (valid, and fitting between the chunks
        around them), cut into even chunks of about `_LOAD` if longer than twice that."""
        n = len(starts)
        if k1 - k0 == 1 and 0 < n <= 2 * _LOAD:
            # The usual small change: one chunk for one (no lists of chunks made).
            self._len += n - len(self._cs[k0])
            if k1 == len(self._cs):
                self._own_last = True
            self._cs[k0] = starts
            self._ce[k0] = ends
            self._first[k0] = starts[0]
            self._last[k0] = ends[-1]
            return
        self._len += n - sum(len(c) for c in self._cs[k0:k1])
        if k1 >= len(self._cs):  # the last chunk is replaced: by new arrays, or by an older one
            self._own_last = n > 0
        if n == 0:
            cs: list[array[int]] = []
            ce: list[array[int]] = []
        elif n <= 2 * _LOAD:
            cs, ce = [starts], [ends]
        else:
            step = -(-n // (n // _LOAD))  # n // _LOAD chunks (at least 2), sizes within one
            cs = [starts[i : i + step] for i in range(0, n, step)]
            ce = [ends[i : i + step] for i in range(0, n, step)]
        self._cs[k0:k1] = cs
        self._ce[k0:k1] = ce
        self._first[k0:k1] = [c[0] for c in cs]
        self._last[k0:k1] = [c[-1] for c in ce]

    def _local(self, k0: int, k1: int) -> tuple[int, int, array[int], array[int]]:
        """Chunks ``[k0, k1)`` as one pair of columns to change and `_splice` back, widened by a
        neighbour when they are small (so chunks never dwindle to a few intervals each).

        For a change to one interval, which swallows whatever lies between the first and the
        last chunk it touches: chunks strictly between them are left out of the columns (they
        are dropped by the splice, never copied)."""
        edges = [k0] if k1 - k0 == 1 else [k0, k1 - 1]
        if sum(len(self._cs[k]) for k in edges) < _LOAD // 2:
            if k1 < len(self._cs):
                k1 += 1
                edges.append(k1 - 1)
            elif k0 > 0:
                k0 -= 1
                edges.insert(0, k0)
        if len(edges) == 1:
            return k0, k1, self._cs[k0][:], self._ce[k0][:]
        return k0, k1, _concat(self._cs[k] for k in edges), _concat(self._ce[k] for k in edges)

    def _chunks_overlapping(self, start: int, end: int) -> tuple[int, int]:
        """Chunk index range ``[k0, k1)`` of the chunks holding an interval that overlaps
        ``[start, end)``, or an empty range where there is none."""
        return bisect_right(self._last, start), bisect_left(self._first, end)

    def _find(self, page: int) -> tuple[int, int]:
        """(chunk, index) of the first interval ending after `page`; (len(chunks), 0) if none."""
        k = bisect_right(self._last, page)
        if k == len(self._cs):
            return k, 0
        return k, bisect_right(self._ce[k], page)

    # -- mutation ---------------------------------------------------------------------------

    def add(self, start: int, end: int) -> None:
        """Add the pages ``[start, end)``, merging with every interval it overlaps or touches."""
        _check(start, end)
        if not self._cs:
            self._splice(0, 0, array("Q", (start,)), array("Q", (end,)))
            return
        last = len(self._cs) - 1
        if start > self._last[last] and len(self._cs[last]) < 2 * _LOAD:
            # Past the last interval, room in the last chunk: O(1) (once the chunk is this
            # set's own).
            if not self._own_last:
                self._cs[last] = self._cs[last][:]
                self._ce[last] = self._ce[last][:]
                self._own_last = True
            self._cs[last].append(start)
            self._ce[last].append(end)
            self._last[last] = end
            self._len += 1
            return
        # The chunks holding an interval that overlaps or touches it: from the first ending at
        # or after `start` to the last starting at or before `end`; else the chunk it goes in.
        k0 = bisect_left(self._last, start)
        k1 = bisect_right(self._first, end)
        if k0 >= k1:
            k0 = min(k0, last)
            k1 = k0 + 1
        k0, k1, starts, ends = self._local(k0, k1)
        _flat_add(starts, ends, start, end)
        self._splice(k0, k1, starts, ends)

    def remove(self, start: int, end: int) -> None:
        """Remove the pages ``[start, end)``, splitting an interval that straddles an edge."""
        _check(start, end)
        k0, k1 = self._chunks_overlapping(start, end)
        if k0 >= k1:
            return
        k0, k1, starts, ends = self._local(k0, k1)
        _flat_remove(starts, ends, start, end)
        self._splice(k0, k1, starts, ends)

    def add_many(self, intervals: Iterable[Interval]) -> None:
        """Add many intervals at once. A batch with more intervals than the set has chunks goes
        in one pass (untouched stretches copied as array slices): k intervals into n cost
        O(k log n) bisections plus one C-level copy; a smaller one goes one interval at a time,
        each costing a chunk."""
        if _few(intervals):
            # A union does not depend on order or overlaps: each goes in as it is, once all
            # are checked (a bad one changes nothing).
            for start, end in intervals:
                _check(start, end)
            for start, end in intervals:
                self.add(start, end)
            return
        batch = RangeSet(intervals)  # sorted, merged, checked
        if not batch:
            return
        if len(batch) <= max(_SMALL_BATCH, len(self._cs)):
            for start, end in batch:
                self.add(start, end)
            return
        if not self._cs:
            # The batch is this call's own: take its chunks (and whether its last is shared).
            self._cs, self._ce, self._first, self._last = (
                batch._cs,
                batch._ce,
                batch._first,
                batch._last,
            )
            self._len, self._own_last = batch._len, batch._own_last
            return
        self._set_columns(*_flat_add_many(*self.columns(), batch))

    def remove_many(self, intervals: Iterable[Interval]) -> None:
        """Remove many intervals at once (see `add_many`)."""
        if _few(intervals):
            for start, end in intervals:
                _check(start, end)
            for start, end in intervals:
                if not self._cs:
                    return
                self.remove(start, end)
            return
        batch = RangeSet(intervals)
        if not batch or not self._cs:
            return
        if len(batch) <= max(_SMALL_BATCH, len(self._cs)):
            for start, end in batch:
                self.remove(start, end)
            return
        if batch == self:
            # Everything goes (a client's whole holding revoked: its very ranges come back):
            # one comparison of the columns in C, not a bisection per interval.
            self._set_columns(array("Q"), array("Q"))
            return
        self._set_columns(*_flat_remove_many(*self.columns(), batch))

    # -- queries over one interval ----------------------------------------------------------

    def _slices(self, start: int, end: int) -> Iterator[tuple[array[int], array[int]]]:
        """The columns' slices holding the intervals that overlap ``[start, end)``, chunk by
        chunk, unclipped."""
        _check(start, end)
        k, i = self._find(start)
        cs, ce = self._cs, self._ce
        while k < len(cs):
            starts = cs[k]
            j = bisect_left(starts, end, i)  # first interval starting at or after `end`
            if j > i:
                yield starts[i:j], ce[k][i:j]
            if j < len(starts):
                return
            k += 1
            i = 0

    def intersection(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are in the set, in order."""
        out: list[Interval] = []
        for starts, ends in self._slices(start, end):
            out += zip(starts, ends, strict=True)
        if out:
            first_start, first_end = out[0]
            if first_start < start:
                out[0] = (start, first_end)
            last_start, last_end = out[-1]
            if last_end > end:
                out[-1] = (last_start, end)
        return out

    def missing(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are not in the set, in order."""
        out: list[Interval] = []
        pos = start
        for starts, ends in self._slices(start, end):
            for s, e in zip(starts, ends, strict=True):
                if s > pos:
                    out.append((pos, s))
                pos = e
        if pos < end:
            out.append((pos, end))
        return out

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any page of ``[start, end)`` is in the set."""
        return self.first_present(start, end) is not None

    def covers(self, start: int, end: int) -> bool:
        """Whether every page of ``[start, end)`` is in the set."""
        _check(start, end)
        k, i = self._find(start)
        return k < len(self._cs) and self._cs[k][i] <= start and self._ce[k][i] >= end

    def first_missing(self, start: int, end: int) -> int | None:
        """The lowest page of ``[start, end)`` not in the set, or None if it is covered."""
        _check(start, end)
        k, i = self._find(start)
        if k < len(self._cs) and self._cs[k][i] <= start:
            pos: int = self._ce[k][i]
            return pos if pos < end else None
        return start

    def first_present(self, start: int, end: int) -> int | None:
        """The lowest page of ``[start, end)`` in the set, or None if none is."""
        _check(start, end)
        k, i = self._find(start)
        if k < len(self._cs) and self._cs[k][i] < end:
            return max(self._cs[k][i], start)
        return None

    def window(self, start: int, count: int) -> list[Interval]:
        """At most `count` intervals from page `start` on (the first one clipped to start):
        a page of a long listing, costing O(log n + count)."""
        if count <= 0:
            return []
        k, i = self._find(start)
        out: list[Interval] = []
        while k < len(self._cs) and len(out) < count:
            take = count - len(out)
            out += zip(self._cs[k][i : i + take], self._ce[k][i : i + take], strict=True)
            k += 1
            i = 0
        if out and out[0][0] < start:
            out[0] = (start, out[0][1])
        return out

    def hull(self, start: int, end: int) -> Interval | None:
        """The smallest interval holding every page of the set inside ``[start, end)``, or
        None if there is none."""
        first = self.first_present(start, end)
        if first is None:
            return None
        k = bisect_left(self._first, end) - 1  # the last chunk starting before `end`
        j = bisect_left(self._cs[k], end) - 1  # its last interval starting before `end`
        return first, min(self._ce[k][j], end)

    # -- whole-set operations ---------------------------------------------------------------

    def intersect(self, other: RangeSet) -> RangeSet:
        """A new set holding the pages in both sets.

        Driven by the set with fewer intervals: each of its intervals selects its overlap in the
        other by bisection, copied as array slices (no object per interval), so intersecting a
        million fragments with a few shared ranges costs a few array copies:
        O(min(n, m) log max(n, m)) bisections plus a C-level copy of the output.
        """
        small, large = (self, other) if len(self) <= len(other) else (other, self)
        if len(small) > len(large._cs) or len(large._cs) == 1:
            # Both large, or the large one a single chunk: one pass over its whole columns
            # beats a chunk lookup per interval.
            return RangeSet.from_columns(*_flat_intersect(*large.columns(), small))
        out = _Builder()
        for start, end in small:
            parts = list(large._slices(start, end))  # fresh slices: clipped in place
            if not parts:
                continue
            first_starts, last_ends = parts[0][0], parts[-1][1]
            if first_starts[0] < start:
                first_starts[0] = start
            if last_ends[-1] > end:
                last_ends[-1] = end
            for s_part, e_part in parts:
                out.add(s_part, e_part)
        return out.build()

    @classmethod
    def from_columns(cls, starts: array[int], ends: array[int]) -> RangeSet:
        """A set made of these columns (cut into chunks; a short pair is used as it is), which
        must already be what a set holds: sorted, disjoint, not touching, each start below its
        end. Not checked beyond the lengths: for callers that built them that way."""
        if len(starts) != len(ends):
            raise ValueError("starts and ends differ in length")
        result = cls()
        result._set_columns(starts, ends)
        return result

    def columns(self) -> Columns:
        """The starts and ends columns, whole: a copy when the set has several chunks, else the
        chunk's own columns (read them, never change them)."""
        if len(self._cs) == 1:
            return self._cs[0], self._ce[0]
        return _concat(self._cs), _concat(self._ce)

    def total(self) -> int:
        """The number of pages in the set, summed chunk by chunk: one sum() over a
        million-entry column is a C call that holds the GIL (other threads' event loops wait)
        ~10 ms."""
        return sum(sum(e) - sum(s) for s, e in zip(self._cs, self._ce, strict=True))

    def copy(self) -> RangeSet:
        """An independent copy (sharing chunks until either set changes one: O(chunks))."""
        return RangeSet(self)

    def __iter__(self) -> Iterator[Interval]:
        """The intervals ``(start, end)`` in ascending order."""
        return itertools.chain.from_iterable(
            zip(s, e, strict=True) for s, e in zip(self._cs, self._ce, strict=True)
        )

    def __len__(self) -> int:
        """The number of intervals (fragments), not pages: see `total`."""
        return self._len

    def __bool__(self) -> bool:
        """Whether the set holds any page."""
        return self._len > 0

    def __eq__(self, other: object) -> bool:
        """Sets are equal when they hold the same pages."""
        if not isinstance(other, RangeSet):
            return NotImplemented
        if self._len != other._len:
            return False
        if self._cs == other._cs and self._ce == other._ce:  # the same cut: no copies
            return True
        return self.columns() == other.columns()

    def __repr__(self) -> str:
        """``RangeSet([(0, 4), (8, 9)])``."""
        return f"RangeSet({list(self)!r})"
