"""Push frames: a change's ranges as session frames within the negotiated size, each distinct
frame encoded once per fan-out, large ones on a worker thread.

Used by the broker core for AccessUpdate and Revoke pushes and attach snapshots. Pure encoding:
nothing here touches a socket or broker state, which is what makes the worker thread safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import ParamSpec, TypeVar, cast

from membroker import wire
from membroker.v1 import session_pb2 as spb
from membrokerd.access import AccessRange

# The most an AccessRange costs encoded (three varints of up to 10 bytes, tags, the submessage
# header), and what a frame's other fields cost at most: how many ranges fit in one frame.
RANGE_BYTES_MAX = 36
FRAME_OVERHEAD = 256
# A change of more ranges than this is encoded on a worker thread, off the event loop.
OFFLOAD_RANGES = 4096
# Range lists up to this long are compared by value to share one encoding between clients.
CACHE_RANGES = 4096

P = ParamSpec("P")
R = TypeVar("R")

# make(part, more) -> the frame carrying one part (`more`: further parts follow)
Make = Callable[[list[spb.AccessRange], bool], spb.Frame]


def access_range_pb(r: AccessRange) -> spb.AccessRange:
    """The wire form of an access-table range (the enums share their numbers by design)."""
    return spb.AccessRange(offset=r.offset, length=r.length, access=cast(spb.Access, int(r.access)))


def split(ranges: Sequence[AccessRange], make: Make, max_frame_bytes: int) -> list[bytes]:
    """Encodes `ranges` as one or more frames, each within `max_frame_bytes`."""
    n = max(1, (max_frame_bytes - FRAME_OVERHEAD) // RANGE_BYTES_MAX)
    total = len(ranges)
    if not total:
        return [wire.encode(make([], False))]
    # One part at a time: its range objects are made and freed before the next part's. A
    # million of them freed together is one C call that holds the GIL for tens of ms.
    return [
        wire.encode(make([access_range_pb(r) for r in ranges[i : i + n]], i + n < total))
        for i in range(0, total, n)
    ]


async def encode(
    loop: asyncio.AbstractEventLoop, ranges: Sequence[AccessRange], make: Make, max_frame: int
) -> list[bytes]:
    """`split`, on a worker thread when the change is large (the ranges are immutable and the
    encoding touches nothing else)."""
    if len(ranges) < OFFLOAD_RANGES:
        return split(ranges, make, max_frame)
    return await loop.run_in_executor(None, without_collector(split), ranges, make, max_frame)


_paused = 0
_paused_lock = threading.Lock()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Keeps Python's cyclic garbage collector from running while a large change is computed
    or encoded. A change of a million fragments builds a million small objects, and the
    collector, triggered by their number, would walk them (and everything else alive) several
    times over, holding the GIL, so holding up the event loop even from a worker thread
    (bench/results/scale.md). Reference counting still frees everything; cycles wait for the
    next collection. Nests, from any thread."""
    global _paused
    with _paused_lock:
        _paused += 1
        if _paused == 1:
            gc.disable()
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0:
                gc.enable()


def without_collector(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run with the collector paused (for worker threads)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with collector_paused():
            return fn(*args, **kwargs)

    return run


class Encoder:
    """The frames of one change's pushes, each distinct range list encoded once (small ones
    are remembered by value; a large one by identity, since hashing a million ranges costs
    more than it saves)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        space_id: str,
        seq: int,
        max_frame_bytes: int,
        deadline_ms: Callable[[int], int],
    ) -> None:
        self.loop = loop
        self.space_id = space_id
        self.seq = seq
        self.max_frame_bytes = max_frame_bytes
        # the deadline a client is given for a revocation of so many ranges
        self.deadline_ms = deadline_ms
        self._cache: dict[tuple[object, ...], list[bytes]] = {}

    def _key(self, kind: str, ranges: Sequence[AccessRange]) -> tuple[object, ...]:
        if len(ranges) <= CACHE_RANGES:
            return (kind, tuple(ranges))
        return (kind, id(ranges))

    async def _frames(self, kind: str, ranges: Sequence[AccessRange], make: Make) -> list[bytes]:
        key = self._key(kind, ranges)
        frames = self._cache.get(key)
        if frames is None:
            frames = self._cache[key] = await encode(self.loop, ranges, make, self.max_frame_bytes)
        return frames

    def snapshot_frames(self, ranges: Sequence[AccessRange]) -> list[bytes]:
        """The frames of an attach snapshot, encoded here and now (on a worker, for a large
        one, together with building `ranges`, so its range objects never reach the loop)."""
        space_id, seq = self.space_id, self.seq
        return split(
            ranges,
            lambda part, more: spb.Frame(
                access_update=spb.AccessUpdate(
                    space_id=space_id, seq=seq, ranges=part, more=more, snapshot=True
                )
            ),
            self.max_frame_bytes,
        )

    async def update(self, ranges: Sequence[AccessRange], snapshot: bool = False) -> list[bytes]:
        """AccessUpdate frames (`snapshot`: an attach snapshot, the client's whole access)."""
        space_id, seq = self.space_id, self.seq
        return await self._frames(
            "snapshot" if snapshot else "update",
            ranges,
            lambda part, more: spb.Frame(
                access_update=spb.AccessUpdate(
                    space_id=space_id, seq=seq, ranges=part, more=more, snapshot=snapshot
                )
            ),
        )

    async def revoke(self, ranges: Sequence[AccessRange], space_deleted: bool) -> list[bytes]:
        """Revoke frames (`space_deleted`: the space is going away)."""
        space_id, seq, deadline_ms = self.space_id, self.seq, self.deadline_ms(len(ranges))
        return await self._frames(
            "revoke",
            ranges,
            lambda part, more: spb.Frame(
                revoke=spb.Revoke(
                    space_id=space_id,
                    seq=seq,
                    ranges=part,
                    space_deleted=space_deleted,
                    deadline_ms=deadline_ms,
                    more=more,
                )
            ),
        )
