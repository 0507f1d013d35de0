"""Waiting for acknowledgements: one `Ack` per (session, space, seq) pushed, grouped in a `Batch`.

Used by the broker core's revocation engine. A batch completes when its last ack arrives or its
session ends, or at the deadline; no task or `asyncio.wait` per client, so a fan-out to many
clients costs one future and one timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from membrokerd.access import AccessRange

if TYPE_CHECKING:
    from membrokerd.broker import Session


@dataclasses.dataclass(slots=True, eq=False)
class Ack:
    """One client's acknowledgement of one Revoke push, awaited."""

    session: Session
    space_id: str
    seq: int
    ranges: tuple[AccessRange, ...]
    sent: float
    batch: Batch
    acked_at: float | None = None
    lost: str | None = None

    @property
    def settled(self) -> bool:
        return self.acked_at is not None or self.lost is not None

    def acknowledge(self, now: float) -> None:
        if not self.settled:
            self.acked_at = now
            self.batch.settle_one()

    def lose(self, reason: str) -> None:
        """The session ended or detached before acknowledging."""
        if not self.settled:
            self.lost = reason
            self.batch.settle_one()


class Batch:
    """The acks one revocation waits for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.acks: list[Ack] = []
        self._remaining = 0
        self._done: asyncio.Future[None] = loop.create_future()

    def expect(
        self, session: Session, space_id: str, seq: int, ranges: tuple[AccessRange, ...]
    ) -> Ack:
        ack = Ack(session, space_id, seq, ranges, time.perf_counter(), self)
        self.acks.append(ack)
        self._remaining += 1
        return ack

    def settle_one(self) -> None:
        self._remaining -= 1
        if self._remaining == 0 and not self._done.done():
            self._done.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Returns when every ack is settled or the timeout passed, whichever comes first."""
        if self._remaining == 0:
            return
        timer = self.loop.call_later(timeout, self._expire)
        try:
            await self._done
        finally:
            timer.cancel()

    def _expire(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
