"""Access table of one space, pure and synchronous: the servicer and revocation engine ask it.

It answers "what changes, and who must be told"; the async layers do the telling. No I/O,
asyncio or logging happens here. Offsets and lengths are bytes at the API and pages inside. A
client's effective access is its grants intersected with the shared pages; every mutation bumps
`AccessTable.seq` by one and returns a `Delta` naming, per client, the ranges whose effective
access went up or down. Pins are the fd+offset clients' "in use" declarations; the table records
them, the revocation engine waits on them.

Exceptions::

    AccessError            root: everything this module raises on purpose
     ├── InvalidRange      bad offset, length, alignment or access level (also a ValueError)
     ├── NotShared         grant over a range with a private page  (.offset: first private byte)
     ├── NotGranted        pin without the needed access  (.client, .offset: first such byte)
     ├── TooFragmented     a batch grant over the fragment limit  (.client, .count, .limit)
     ├── StaleChange       a prepared grant committed after another mutation  (.prepared, .now)
     ├── TooManyPins       a pin over the holder's pin limit  (.holder, .limit)
     └── UnknownPin        unpin of an id that is not held  (.pin_id)

A call that raises changes nothing, `seq` included.
"""

from __future__ import annotations

import enum
import itertools
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from membroker.rangeset import RangeSet, touching

__all__ = [
    "Access",
    "AccessError",
    "AccessRange",
    "AccessTable",
    "ClientDelta",
    "Delta",
    "InvalidRange",
    "LevelRuns",
    "NotGranted",
    "NotShared",
    "Pin",
    "PreparedGrant",
    "Runs",
    "StaleChange",
    "TooFragmented",
    "TooManyPins",
    "UnknownPin",
]


class Access(enum.IntEnum):
    """An access level; ordered, so the minimum over a range is meaningful."""

    NONE = 0
    RO = 1
    RW = 2

    def __repr__(self) -> str:
        """``Access.RO``."""
        return f"Access.{self.name}"


_BY_VALUE = (Access.NONE, Access.RO, Access.RW)  # level by value, for column readers


# -- errors -------------------------------------------------------------------------------------


class AccessError(Exception):
    """Root of the errors the access table raises."""


class InvalidRange(AccessError, ValueError):
    """A byte range (or access level) the table refuses: negative, empty, unaligned, too long."""

    def __init__(self, offset: int, length: int, reason: str) -> None:
        super().__init__(f"invalid range offset={offset!r} length={length!r}: {reason}")
        self.offset = offset
        self.length = length
        self.reason = reason


class NotShared(AccessError):
    """A grant over a range that is not entirely shared; `offset` is the first private byte."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"range is not shared: first private byte at offset {offset:#x}")
        self.offset = offset


class NotGranted(AccessError):
    """A pin over a range where `client` lacks access; `offset` is the first such byte."""

    def __init__(self, client: str, offset: int) -> None:
        super().__init__(f"client {client!r} lacks the needed access at offset {offset:#x}")
        self.client = client
        self.offset = offset


class TooFragmented(AccessError):
    """A grant would leave `client` with more than `limit` stored grant ranges (`count`)."""

    def __init__(self, client: str, count: int, limit: int) -> None:
        super().__init__(
            f"client {client!r} would hold {count} grant ranges in this space (limit {limit})"
        )
        self.client = client
        self.count = count
        self.limit = limit


class TooManyPins(AccessError):
    """`holder` already holds `limit` pins in this space."""

    def __init__(self, holder: str, limit: int) -> None:
        super().__init__(f"{holder!r} already holds {limit} pins in this space (the limit)")
        self.holder = holder
        self.limit = limit


class StaleChange(AccessError):
    """A prepared change no longer fits the table: something else changed it in between."""

    def __init__(self, prepared: int, now: int) -> None:
        super().__init__(f"change prepared at seq {prepared}, table now at seq {now}")
        self.prepared = prepared
        self.now = now


class UnknownPin(AccessError):
    """An unpin of a pin id the table does not hold."""

    def __init__(self, pin_id: int) -> None:
        super().__init__(f"unknown pin id {pin_id}")
        self.pin_id = pin_id


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessRange:
    """`length` bytes from `offset` at one access level."""

    offset: int
    length: int
    access: Access


class _LazyRanges(Sequence[AccessRange]):
    """Byte ranges kept as page columns; the range objects are made only on demand (a million
    small objects cost the collector more than their making, see bench/scale_bench.py).
    Compares equal to any sequence of the same ranges."""

    __slots__ = ()

    def _columns(self) -> tuple[Sequence[int], Sequence[int], Sequence[int], int]:
        """Starts and ends (pages), levels (Access values) and the page size."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._columns()[0])

    @overload
    def __getitem__(self, index: int) -> AccessRange: ...

    @overload
    def __getitem__(self, index: slice) -> list[AccessRange]: ...

    def __getitem__(self, index: int | slice) -> AccessRange | list[AccessRange]:
        starts, ends, levels, ps = self._columns()
        if isinstance(index, slice):
            return [
                AccessRange(s * ps, (e - s) * ps, _BY_VALUE[v])
                for s, e, v in zip(starts[index], ends[index], levels[index], strict=True)
            ]
        s, e = starts[index], ends[index]
        return AccessRange(s * ps, (e - s) * ps, _BY_VALUE[levels[index]])

    def __iter__(self) -> Iterator[AccessRange]:
        starts, ends, levels, ps = self._columns()
        for s, e, v in zip(starts, ends, levels, strict=True):
            yield AccessRange(s * ps, (e - s) * ps, _BY_VALUE[v])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if len(self) <= 8:
            return repr(tuple(self))
        return f"{type(self).__name__}({len(self)} ranges)"


class _Same(Sequence[int]):
    """`length` times `value`, without storing them (a level column of one level: slicing a
    million-run column per encoded frame must not build a million-byte copy each time)."""

    __slots__ = ("_length", "_value")

    def __init__(self, value: int, length: int) -> None:
        self._value = value
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        return itertools.repeat(self._value, self._length)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> _Same: ...

    def __getitem__(self, index: int | slice) -> int | _Same:
        if isinstance(index, slice):
            return _Same(self._value, len(range(*index.indices(self._length))))
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._value


class Runs(_LazyRanges):
    """Page runs at one access level, handed out as byte ranges on demand.

    A revocation of a million fragments costs two arrays here until someone asks for the
    range objects, which the broker does on a worker thread (encoding, verifying), not on its
    event loop.
    """

    __slots__ = ("_cols", "_level", "_pages", "_ps")

    def __init__(self, pages: RangeSet, page_size: int, level: Access) -> None:
        self._pages = pages
        self._ps = page_size
        self._level = level
        self._cols: tuple[array[int], array[int]] | None = None

    @property
    def pages(self) -> RangeSet:
        """The runs as a page set (do not modify)."""
        return self._pages

    @property
    def level(self) -> Access:
        """The access level every run is at."""
        return self._level

    @property
    def byte_total(self) -> int:
        return self._pages.total() * self._ps

    def __len__(self) -> int:
        return len(self._pages)

    def _columns(self) -> tuple[Sequence[int], Sequence[int], Sequence[int], int]:
        if self._cols is None:  # whole columns are a copy of a chunked set's: made once
            self._cols = self._pages.columns()
        starts, ends = self._cols
        return starts, ends, _Same(self._level, len(starts)), self._ps

    def __iter__(self) -> Iterator[AccessRange]:
        ps, level = self._ps, self._level
        for s, e in self._pages:
            yield AccessRange(s * ps, (e - s) * ps, level)

    def __repr__(self) -> str:
        if len(self) <= 8:
            return repr(tuple(self))
        return f"Runs({len(self)} ranges, {self._level!r})"


class LevelRuns(_LazyRanges):
    """Sorted page runs, each at its own level, adjacent runs of one level merged: what
    `effective` and a conversion to shared hand out, as columns until someone reads them."""

    __slots__ = ("_ends", "_levels", "_ps", "_starts")

    def __init__(self, page_size: int) -> None:
        self._starts: array[int] = array("Q")
        self._ends: array[int] = array("Q")
        self._levels = bytearray()
        self._ps = page_size

    def _columns(self) -> tuple[Sequence[int], Sequence[int], Sequence[int], int]:
        return self._starts, self._ends, self._levels, self._ps

    def page_sets(self) -> dict[Access, RangeSet]:
        """The runs as one page set per level, built from the columns (no object per run)."""
        cols: dict[int, tuple[array[int], array[int]]] = {}
        for start, end, value in zip(self._starts, self._ends, self._levels, strict=True):
            found = cols.get(value)
            if found is None:
                found = cols[value] = (array("Q"), array("Q"))
            found[0].append(start)
            found[1].append(end)
        # Runs of one level are never adjacent (merged as they are added): valid sets as they are.
        return {_BY_VALUE[v]: RangeSet.from_columns(a, b) for v, (a, b) in cols.items()}

    def extend_split(
        self, readable: Iterable[tuple[int, int]], writable: Iterable[tuple[int, int]]
    ) -> None:
        """Append the sorted page intervals of `readable` (after every run so far), RW where
        `writable` (which must lie within `readable`) covers them and RO elsewhere: a linear
        merge of the two."""
        starts, ends, levels = self._starts, self._ends, self._levels
        w_iter = iter(writable)
        w_start, w_end = next(w_iter, (-1, -1))

        def put(start: int, end: int, level: int) -> None:
            if ends and ends[-1] == start and levels[-1] == level:
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
                levels.append(level)

        for start, end in readable:
            pos = start
            while 0 <= w_start < end:  # writable pieces start inside [start, end)
                if w_start > pos:
                    put(pos, w_start, 1)
                put(w_start, w_end, 2)
                pos = w_end
                w_start, w_end = next(w_iter, (-1, -1))
            if pos < end:
                put(pos, end, 1)


@dataclass(frozen=True, slots=True)
class ClientDelta:
    """How one client's effective access changed.

    `raised`: ranges whose access went up, carrying the new level (RO or RW). `lowered`: ranges
    whose access went down, carrying the new level (NONE or RO). Sorted; adjacent ranges with the
    same new level are coalesced.
    """

    client: str
    raised: Sequence[AccessRange]
    lowered: Sequence[AccessRange]

    @property
    def lowered_bytes(self) -> int:
        """How many bytes lost access (without building a range object, for `Runs`)."""
        if isinstance(self.lowered, Runs):
            return self.lowered.byte_total
        return sum(r.length for r in self.lowered)


@dataclass(frozen=True, slots=True)
class Delta:
    """The effect of one mutation: the table's new `seq` and the clients it changed, by name."""

    seq: int
    clients: tuple[ClientDelta, ...]

    @property
    def lowered_clients(self) -> tuple[str, ...]:
        """Names of the clients that lost access somewhere: these must be revoked and waited on."""
        return tuple(c.client for c in self.clients if c.lowered)

    @property
    def is_empty(self) -> bool:
        """Whether no client's effective access changed."""
        return all(not c.raised and not c.lowered for c in self.clients)


@dataclass(frozen=True, slots=True)
class PreparedGrant:
    """A grant computed by `AccessTable.prepare_grant`, for `commit_grant`: the client's new
    page sets and its delta, against the table as it was at `seq` (and the client's grant
    record then, `grants`, None if it had none)."""

    seq: int
    client: str
    grants: _Grants | None
    readable: RangeSet
    writable: RangeSet
    change: ClientDelta | None


@dataclass(frozen=True, slots=True)
class Pin:
    """`holder` (a session) uses `client`'s access to `length` bytes from `offset` since `since`
    (a `time.monotonic()` value); `write` pins need RW."""

    pin_id: int
    holder: str
    client: str
    offset: int
    length: int
    write: bool
    since: float


def pin_span(pin: Pin) -> tuple[int, int]:
    """The pin's bytes, ``[offset, offset + length)``."""
    return pin.offset, pin.offset + pin.length


def _coalesce(ranges: list[AccessRange]) -> tuple[AccessRange, ...]:
    """Sorted ranges with adjacent ranges of one level merged."""
    out: list[AccessRange] = []
    for r in ranges:
        if out and out[-1].offset + out[-1].length == r.offset and out[-1].access == r.access:
            last = out[-1]
            out[-1] = AccessRange(last.offset, last.length + r.length, last.access)
        else:
            out.append(r)
    return tuple(out)


# -- the table ----------------------------------------------------------------------------------

_Piece = tuple[int, int, Access]  # pages [start, end) at one level

# Module constants: looking a member up on the enum class costs ~0.2 µs, a global ~0.02 µs.
_NONE, _RO, _RW = Access.NONE, Access.RO, Access.RW


class _Grants:
    """One client's grants in pages: `readable` holds RO and RW, `writable` (a subset) RW."""

    __slots__ = ("readable", "writable")

    def __init__(self) -> None:
        self.readable = RangeSet()
        self.writable = RangeSet()


def _split_levels(
    readable: Iterable[tuple[int, int]], writable: Iterable[tuple[int, int]]
) -> list[_Piece]:
    """Label the sorted intervals of `readable` RW where `writable` covers them and RO elsewhere.

    `writable` must lie within `readable`. A linear merge of the two.
    """
    out: list[_Piece] = []
    w_iter = iter(writable)
    w_start, w_end = next(w_iter, (-1, -1))
    for start, end in readable:
        pos = start
        while 0 <= w_start < end:  # writable pieces start inside [start, end) as w ⊆ readable
            if w_start > pos:
                out.append((pos, w_start, _RO))
            out.append((w_start, w_end, _RW))
            pos = w_end
            w_start, w_end = next(w_iter, (-1, -1))
        if pos < end:
            out.append((pos, end, _RO))
    return out


class AccessTable:
    """Shared pages, per-client grants and pins of one space of `size` bytes.

    Grants persist independently of the shared attribute; effective access is grants ∩ shared.
    Every mutating call (`set_shared`, `set_private`, `grant`, `revoke`, `drop_client`) increments
    `seq` by exactly one, even when nothing changes, and returns the `Delta`; pins leave `seq`
    alone. Cost is proportional to the fragments inside the range touched, never to its pages.
    """

    __slots__ = (
        "_grants",
        "_next_pin",
        "_page_size",
        "_pin_counts",
        "_pins",
        "_seq",
        "_shared",
        "_size",
    )

    def __init__(self, size: int, page_size: int = 4096) -> None:
        """An empty table: every page private, no grants, no pins, `seq` 0."""
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, not {page_size}")
        if size <= 0 or size % page_size:
            raise InvalidRange(0, size, f"size must be a positive multiple of {page_size}")
        self._size = size
        self._page_size = page_size
        self._seq = 0
        self._shared = RangeSet()
        self._grants: dict[str, _Grants] = {}
        self._pins: dict[int, Pin] = {}
        self._pin_counts: dict[str, int] = {}  # pins per holder
        self._next_pin = 1

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The space's size in bytes."""
        return self._size

    @property
    def page_size(self) -> int:
        """The granule of every offset and length, in bytes."""
        return self._page_size

    @property
    def seq(self) -> int:
        """The number of mutating calls so far; the `seq` of the latest `Delta`."""
        return self._seq

    @property
    def shared(self) -> RangeSet:
        """A copy of the shared pages (page numbers, not bytes)."""
        return self._shared.copy()

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        """Validate a byte range and return it as pages ``[start, end)``."""
        ps = self._page_size
        if not isinstance(offset, int) or not isinstance(length, int):
            reason = "offset and length must be integers"
        elif length <= 0:
            reason = "length must be positive"
        elif offset < 0:
            reason = "offset must not be negative"
        elif offset % ps or length % ps:
            reason = f"offset and length must be multiples of the page size {ps}"
        elif offset + length > self._size:
            reason = f"range ends past the end of the space ({self._size} bytes)"
        else:
            return offset // ps, (offset + length) // ps
        raise InvalidRange(offset, length, reason)

    def _ranges(self, pieces: list[_Piece]) -> tuple[AccessRange, ...]:
        """Sorted page pieces as byte ranges, adjacent pieces of one level coalesced."""
        ps = self._page_size
        out: list[AccessRange] = []
        cur_start = cur_end = -1
        cur_level = _NONE
        for start, end, level in pieces:
            if start == cur_end and level == cur_level:
                cur_end = end
                continue
            if cur_end >= 0:
                out.append(AccessRange(cur_start * ps, (cur_end - cur_start) * ps, cur_level))
            cur_start, cur_end, cur_level = start, end, level
        if cur_end >= 0:
            out.append(AccessRange(cur_start * ps, (cur_end - cur_start) * ps, cur_level))
        return tuple(out)

    def _commit(self, clients: list[ClientDelta]) -> Delta:
        """Bump `seq` and wrap the per-client changes."""
        self._seq += 1
        return Delta(self._seq, tuple(clients))

    def check_spans(self, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Validate byte ranges ``(offset, length)`` for a batch: each valid, together sorted
        and disjoint. Returns them as a list; raises InvalidRange naming the first bad one."""
        out = list(spans)
        if not out:
            raise InvalidRange(0, 0, "a batch needs at least one range")
        prev_end = -1
        for offset, length in out:
            start, end = self._pages(offset, length)
            if start < prev_end:
                raise InvalidRange(offset, length, "batch ranges must be sorted and disjoint")
            prev_end = end
        return out

    def _page_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        ps = self._page_size
        return [(offset // ps, (offset + length) // ps) for offset, length in spans]

    def _as_ranges(self, pieces: list[tuple[int, int]], level: Access) -> list[AccessRange]:
        ps = self._page_size
        return [AccessRange(s * ps, (e - s) * ps, level) for s, e in pieces]

    def grant_many(
        self,
        client: str,
        spans: Iterable[tuple[int, int]],
        access: Access,
        max_fragments: int | None = None,
    ) -> Delta:
        """`grant` over several sorted, disjoint byte ranges as one mutation (one seq). Every
        range is checked (InvalidRange, NotShared) before anything changes; the sets change in
        one pass each (`RangeSet.add_many`), so k ranges cost O(k log n), not k array moves.
        With `max_fragments`, a result over that many stored ranges (`fragment_count`) is
        refused with TooFragmented: the exact count, not an estimate."""
        return self.commit_grant(self.prepare_grant(client, spans, access, max_fragments))

    def prepare_grant(
        self,
        client: str,
        spans: Iterable[tuple[int, int]],
        access: Access,
        max_fragments: int | None = None,
    ) -> PreparedGrant:
        """What `grant_many` would do, computed without changing anything: the client's new
        sets and the delta. Only reads the table, so a large batch can be prepared on a worker
        thread while the loop keeps serving from the current state; `commit_grant` applies it
        if no mutation came in between. Raises what `grant_many` raises."""
        checked = self.check_spans(spans)
        if access != _RO and access != _RW:
            offset, length = checked[0]
            raise InvalidRange(offset, length, f"grant access must be RO or RW, not {access!r}")
        pages = self._page_spans(checked)
        for start, end in pages:
            first_private = self._shared.first_missing(start, end)
            if first_private is not None:
                raise NotShared(first_private * self._page_size)
        g = self._grants.get(client)
        readable = g.readable.copy() if g is not None else RangeSet()
        writable = g.writable.copy() if g is not None else RangeSet()
        raised: list[tuple[int, int]] = []
        lowered: list[tuple[int, int]] = []
        if access == _RW:
            for start, end in pages:
                raised += writable.missing(start, end)
            readable.add_many(pages)
            writable.add_many(pages)
        else:
            for start, end in pages:
                raised += readable.missing(start, end)
                lowered += writable.intersection(start, end)
            readable.add_many(pages)
            writable.remove_many(pages)
        if max_fragments is not None:
            count = len(readable) + len(writable)
            if count > max_fragments:
                raise TooFragmented(client, count, max_fragments)
        change = None
        if raised or lowered:
            change = ClientDelta(
                client,
                _coalesce(self._as_ranges(raised, access)),
                _coalesce(self._as_ranges(lowered, _RO)),
            )
        return PreparedGrant(self._seq, client, g, readable, writable, change)

    def commit_grant(self, prepared: PreparedGrant) -> Delta:
        """Apply a `prepare_grant` result: the one mutation (seq + 1). Raises StaleChange,
        changing nothing, when the table was mutated after the preparation (prepare again)."""
        if prepared.seq != self._seq or self._grants.get(prepared.client) is not prepared.grants:
            raise StaleChange(prepared.seq, self._seq)
        g = self._grants.get(prepared.client)
        if g is None:
            g = self._grants[prepared.client] = _Grants()
        g.readable, g.writable = prepared.readable, prepared.writable
        self._seq += 1
        if prepared.change is None:
            return Delta(self._seq, ())
        return Delta(self._seq, (prepared.change,))

    def revoke_many(self, client: str, spans: Iterable[tuple[int, int]]) -> Delta:
        """`revoke` over several sorted, disjoint byte ranges as one mutation (one seq)."""
        pages = self._page_spans(self.check_spans(spans))
        g = self._grants.get(client)
        if g is None:
            return self._commit([])
        # What it loses: its readable pages in the spans that are shared. Array work, however
        # many fragments: the ranges themselves are made only when someone asks (see Runs).
        lost = g.readable.intersect(RangeSet(pages)).intersect(self._shared)
        g.readable.remove_many(pages)
        g.writable.remove_many(pages)
        if not g.readable:
            del self._grants[client]
        if lost:
            return self._commit([ClientDelta(client, (), Runs(lost, self._page_size, _NONE))])
        return self._commit([])

    def set_shared_many(self, spans: Iterable[tuple[int, int]]) -> Delta:
        """`set_shared` over several sorted, disjoint byte ranges as one mutation (one seq)."""
        pages = self._page_spans(self.check_spans(spans))
        newly = RangeSet(
            [piece for start, end in pages for piece in self._shared.missing(start, end)]
        )
        changes: list[ClientDelta] = []
        if newly:
            for name in sorted(self._grants):
                g = self._grants[name]
                readable = g.readable.intersect(newly)
                if readable:
                    gained = LevelRuns(self._page_size)
                    gained.extend_split(readable, g.writable.intersect(newly))
                    changes.append(ClientDelta(name, gained, ()))
            self._shared.add_many(pages)
        return self._commit(changes)

    def set_private_many(self, spans: Iterable[tuple[int, int]]) -> Delta:
        """`set_private` over several sorted, disjoint byte ranges as one mutation (one seq)."""
        pages = self._page_spans(self.check_spans(spans))
        was_shared = self._shared.intersect(RangeSet(pages))
        changes: list[ClientDelta] = []
        if was_shared:
            for name in sorted(self._grants):
                lost = self._grants[name].readable.intersect(was_shared)
                if lost:
                    changes.append(ClientDelta(name, (), Runs(lost, self._page_size, _NONE)))
            self._shared.remove_many(pages)
        return self._commit(changes)

    def set_shared(self, offset: int, length: int) -> Delta:
        """Make a range shared; clients granted pages there that were private gain access."""
        return self.set_shared_many([(offset, length)])

    def set_private(self, offset: int, length: int) -> Delta:
        """Make a range private (owner only); clients granted shared pages there lose them."""
        return self.set_private_many([(offset, length)])

    def is_shared(self, offset: int, length: int) -> bool:
        """Whether every page of the range is shared."""
        return self._shared.covers(*self._pages(offset, length))

    def shared_bytes(self) -> int:
        """How many bytes are shared."""
        return self._shared.total() * self._page_size

    # -- grants ---------------------------------------------------------------------------------

    def grant(self, client: str, offset: int, length: int, access: Access) -> Delta:
        """Set `client`'s grant over a wholly shared range to exactly `access` (RO or RW).

        Raises InvalidRange for a bad range or an access of NONE, NotShared if a page is private.
        """
        # The hot path of building a fragmented grant pattern: kept free of generic helpers.
        start, end = self._pages(offset, length)
        if access != _RO and access != _RW:
            raise InvalidRange(offset, length, f"grant access must be RO or RW, not {access!r}")
        first_private = self._shared.first_missing(start, end)
        if first_private is not None:
            raise NotShared(first_private * self._page_size)
        g = self._grants.get(client)
        if g is None:
            g = self._grants[client] = _Grants()
        ps = self._page_size
        # missing() and intersection() return maximal, separated pieces: already coalesced.
        lowered: tuple[AccessRange, ...] = ()
        if access == _RW:
            raised = tuple(
                [AccessRange(s * ps, (e - s) * ps, _RW) for s, e in g.writable.missing(start, end)]
            )
            g.readable.add(start, end)
            g.writable.add(start, end)
        else:
            raised = tuple(
                [AccessRange(s * ps, (e - s) * ps, _RO) for s, e in g.readable.missing(start, end)]
            )
            was_writable = g.writable.intersection(start, end)
            g.readable.add(start, end)
            if was_writable:
                lowered = tuple([AccessRange(s * ps, (e - s) * ps, _RO) for s, e in was_writable])
                g.writable.remove(start, end)
        self._seq += 1
        if raised or lowered:
            return Delta(self._seq, (ClientDelta(client, raised, lowered),))
        return Delta(self._seq, ())

    def revoke(self, client: str, offset: int, length: int) -> Delta:
        """Remove `client`'s grants in a range; where they were effective, access drops to NONE."""
        return self.revoke_many(client, [(offset, length)])

    def drop_client(self, client: str) -> Delta:
        """Remove every grant of `client` (it was fenced); all its access drops to NONE."""
        g = self._grants.pop(client, None)
        if g is None:
            return self._commit([])
        lost = g.readable.intersect(self._shared)
        if lost:
            return self._commit([ClientDelta(client, (), Runs(lost, self._page_size, _NONE))])
        return self._commit([])

    def forget_client(self, client: str) -> int:
        """Remove every grant of `client` without computing what it lost (a fenced client has
        no session left to tell): O(1) however many fragments it held. Bumps `seq` like any
        mutation and returns it."""
        self._grants.pop(client, None)
        self._seq += 1
        return self._seq

    def effective(self, client: str) -> Sequence[AccessRange]:
        """`client`'s effective access (grants ∩ shared), sorted and coalesced."""
        g = self._grants.get(client)
        if g is None:
            return []
        runs = LevelRuns(self._page_size)
        runs.extend_split(g.readable.intersect(self._shared), g.writable.intersect(self._shared))
        return runs

    def effective_in(self, client: str, offset: int, length: int) -> list[AccessRange]:
        """`client`'s effective access inside one byte range: cost in proportion to the
        fragments there, not to the client's whole pattern."""
        start, end = self._pages(offset, length)
        g = self._grants.get(client)
        if g is None:
            return []
        pieces: list[_Piece] = []
        for s_start, s_end in self._shared.intersection(start, end):
            readable = g.readable.intersection(s_start, s_end)
            if readable:
                pieces += _split_levels(readable, g.writable.intersection(s_start, s_end))
        return list(self._ranges(pieces))

    def allowed_sets(self, client: str) -> tuple[RangeSet, RangeSet]:
        """`client`'s effective access as page sets (readable, writable ⊆ readable): what an
        audit compares mappings with, without building a range object per fragment."""
        g = self._grants.get(client)
        if g is None:
            return RangeSet(), RangeSet()
        return g.readable.intersect(self._shared), g.writable.intersect(self._shared)

    def ranges_of(self, readable: RangeSet, writable: RangeSet) -> Sequence[AccessRange]:
        """Page sets (as `allowed_sets` returns them) as sorted, coalesced byte ranges. Reads
        only its arguments: safe on a worker thread with sets the loop no longer touches.
        Columns, not a list: freeing a million tuples at once is one C call that holds the GIL
        (and so the event loop) for tens of milliseconds."""
        runs = LevelRuns(self._page_size)
        runs.extend_split(readable, writable)
        return runs

    def has_grants(self, client: str) -> bool:
        """Whether `client` holds any grant record (shared or not)."""
        return client in self._grants

    def has_rw_grant(self, client: str) -> bool:
        """Whether `client` holds any read-write grant record (shared or not)."""
        g = self._grants.get(client)
        return g is not None and bool(g.writable)

    def retire(self) -> int:
        """The space is being deleted: bump `seq` once for that change and return it (the
        revocation of everything from every attached session carries it)."""
        self._seq += 1
        return self._seq

    def effective_access(self, client: str, offset: int, length: int) -> Access:
        """The lowest effective access `client` has on any page of the range."""
        start, end = self._pages(offset, length)
        g = self._grants.get(client)
        if g is None or not self._shared.covers(start, end):
            return _NONE
        if g.writable.covers(start, end):
            return _RW
        if g.readable.covers(start, end):
            return _RO
        return _NONE

    def grants(self, client: str | None = None) -> list[tuple[str, AccessRange]]:
        """The grant records (not intersected with shared) of `client`, or of every client,
        sorted by client name then offset."""
        names = sorted(self._grants) if client is None else [client]
        out: list[tuple[str, AccessRange]] = []
        for name in names:
            g = self._grants.get(name)
            if g is not None:
                out += [(name, r) for r in self._ranges(_split_levels(g.readable, g.writable))]
        return out

    def grants_page(
        self, client: str | None, start_client: str, start_offset: int, limit: int
    ) -> tuple[list[tuple[str, AccessRange]], tuple[str, int] | None]:
        """A page of `grants(client)`: at most `limit` records from (start_client,
        start_offset) on, and where the next page starts (None: this was the last). Costs
        O(log n + limit), however many fragments the clients hold."""
        ps = self._page_size
        names = [client] if client is not None else sorted(self._grants)
        out: list[tuple[str, AccessRange]] = []
        for name in names:
            if name < start_client:
                continue
            g = self._grants.get(name)
            if g is None:
                continue
            first = start_offset // ps if name == start_client else 0
            room = limit - len(out)
            readable = g.readable.window(first, room + 1)
            if not readable:
                continue
            lo, hi = readable[0][0], readable[-1][1]
            pieces = _split_levels(readable, g.writable.intersection(lo, hi))
            records = self._ranges(pieces)
            if len(records) > room:
                out += [(name, r) for r in records[:room]]
                return out, (name, records[room].offset)
            out += [(name, r) for r in records]
            if len(out) == limit:
                later = g.readable.first_present(hi, 2**64 - 1) if hi < 2**64 - 1 else None
                if later is not None:
                    return out, (name, later * ps)
                rest = [n for n in names if n > name and n in self._grants]
                return out, ((rest[0], 0) if rest else None)
        return out, None

    def clients(self) -> list[str]:
        """Sorted names of the clients holding any grant."""
        return sorted(self._grants)

    def fragment_count(self, client: str | None = None) -> int:
        """Grant intervals stored, about 16 bytes each: every client's (or one client's)
        readable (RO or RW) set plus its writable set, so an RW range counts twice; shared
        intervals are not counted."""
        if client is not None:
            g = self._grants.get(client)
            return len(g.readable) + len(g.writable) if g is not None else 0
        return sum(len(g.readable) + len(g.writable) for g in self._grants.values())

    # -- pins -----------------------------------------------------------------------------------

    def pin(
        self,
        holder: str,
        client: str,
        offset: int,
        length: int,
        write: bool = False,
        now: float | None = None,
        max_pins: int | None = None,
    ) -> Pin:
        """Record that `holder` uses `client`'s access to the range; each call is its own pin.

        Needs effective RO (RW if `write`) over the whole range, else NotGranted naming the first
        byte lacking it. With `max_pins`, a holder that already holds that many pins in this
        table gets TooManyPins (every revocation looks at every pin it overlaps: their number
        must stay bounded). `now` defaults to `time.monotonic()`.
        """
        start, end = self._pages(offset, length)
        held = self._pin_counts.get(holder, 0)
        if max_pins is not None and held >= max_pins:
            raise TooManyPins(holder, max_pins)
        g = self._grants.get(client)
        if g is None:
            first: int | None = start
        else:
            first = (g.writable if write else g.readable).first_missing(start, end)
            first_private = self._shared.first_missing(start, end)
            if first is None or (first_private is not None and first_private < first):
                first = first_private
        if first is not None:
            raise NotGranted(client, first * self._page_size)
        pin = Pin(
            self._next_pin,
            holder,
            client,
            offset,
            length,
            write,
            time.monotonic() if now is None else now,
        )
        self._next_pin += 1
        self._pins[pin.pin_id] = pin
        self._pin_counts[holder] = held + 1
        return pin

    def _forget_pin(self, pin: Pin) -> None:
        del self._pins[pin.pin_id]
        left = self._pin_counts[pin.holder] - 1
        if left:
            self._pin_counts[pin.holder] = left
        else:
            del self._pin_counts[pin.holder]

    def unpin(self, pin_id: int) -> Pin:
        """Release one pin and return it; UnknownPin if it is not held."""
        pin = self._pins.get(pin_id)
        if pin is None:
            raise UnknownPin(pin_id) from None
        self._forget_pin(pin)
        return pin

    def pin_count(self, holder: str) -> int:
        """How many pins `holder` holds in this table."""
        return self._pin_counts.get(holder, 0)

    def pins(self, holder: str | None = None) -> list[Pin]:
        """The pins of `holder`, or all pins, in pin id order."""
        return [p for p in self._pins.values() if holder is None or p.holder == holder]

    def pins_overlapping(self, offset: int, length: int, client: str | None = None) -> list[Pin]:
        """The pins (of `client`, or of anyone) touching any byte of the range, in id order."""
        self._pages(offset, length)
        end = offset + length
        return [
            p
            for p in self._pins.values()
            if p.offset < end
            and offset < p.offset + p.length
            and (client is None or p.client == client)
        ]

    def release_pins(
        self, holder: str, ranges: Iterable[tuple[int, int]] | None = None
    ) -> list[Pin]:
        """Release `holder`'s pins touching any of the byte ``(offset, length)`` ranges, or all
        of its pins when `ranges` is None; return them in id order."""
        mine = [p for p in self._pins.values() if p.holder == holder]
        if ranges is None:
            released = mine
        else:
            spans = list(ranges)
            for offset, length in spans:
                self._pages(offset, length)
            released = touching(mine, pin_span, [(o, o + n) for o, n in spans])
        for p in released:
            self._forget_pin(p)
        return released

    def is_pinned(self, offset: int, length: int) -> bool:
        """Whether any pin touches any byte of the range."""
        self._pages(offset, length)
        end = offset + length
        return any(p.offset < end and offset < p.offset + p.length for p in self._pins.values())

    def __repr__(self) -> str:
        """``AccessTable(size=…, page_size=…, seq=…, shared_bytes=…, clients=…, pins=…)``."""
        return (
            f"AccessTable(size={self._size}, page_size={self._page_size}, seq={self._seq}, "
            f"shared_bytes={self.shared_bytes()}, clients={len(self._grants)}, "
            f"pins={len(self._pins)})"
        )
