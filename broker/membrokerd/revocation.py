"""The revocation engine's primitives: one ordered queue of changes per space, and acks judged as
they arrive.

Used by the broker core. Every change to a space (attributes, grants, revocations, deletion, its
audit) runs as a job of that space's `SpaceQueue`, one at a time, in submission order, with the
table's one seq counter: two changes never interleave, so a client is only ever asked to
acknowledge one thing per space at a time. A job runs to its end even if the call that submitted
it is cancelled (the caller awaits it shielded); its report is kept in the queue's `history`.

A revocation pushes to many clients and waits for one `Batch`: one future and one timer, no task
per client. Each `Ack` is judged the moment it arrives (`judge` asks the kernel what the client
still reaches), so the verdict reflects what the client held at that moment.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from membrokerd.access import AccessRange

if TYPE_CHECKING:
    from membrokerd.sessions import Session

log = logging.getLogger("membrokerd.revocation")

T = TypeVar("T")

# Reports kept per space for ListRevocations.
HISTORY = 64


class Verdict(enum.Enum):
    """What became of one client's part of a revocation."""

    PENDING = "pending"
    ACKED = "acked"  # acknowledged, and the kernel shows nothing reachable beyond its access
    CAUGHT = "caught"  # acknowledged, but the kernel shows it still reaches revoked pages
    UNVERIFIED = "unverified"  # acknowledged; the kernel's view could not be read
    REFUSED = "refused"  # the client said it could not tear down
    LOST = "lost"  # the session ended or detached before acknowledging


@dataclasses.dataclass(slots=True, eq=False)
class Ack:
    """One client's acknowledgement of one revocation, awaited."""

    session: Session
    space_id: str
    seq: int
    ranges: Sequence[AccessRange]
    sent: float
    batch: Batch
    verdict: Verdict = Verdict.PENDING
    settled_at: float | None = None
    reason: str = ""
    # When the acknowledgement arrived, if its verdict is still being worked out.
    acked_at: float | None = None
    # The time this client was given (grows with the number of ranges).
    deadline_ms: int = 0
    # (offset, length) ranges the client gave up with its acknowledgement (RevokeAck.withdrawn)
    withdrawn: tuple[tuple[int, int], ...] = ()
    # (offset, length) byte ranges of buffers lost in flight (RevokeAck.in_flight)
    in_flight: tuple[tuple[int, int], ...] = ()

    @property
    def settled(self) -> bool:
        return self.verdict is not Verdict.PENDING

    @property
    def latency(self) -> float:
        return (self.settled_at or time.perf_counter()) - self.sent

    def settle(self, verdict: Verdict, reason: str = "", now: float | None = None) -> None:
        """Records the verdict (the first one counts) and tells the batch."""
        if self.settled:
            return
        self.verdict = verdict
        self.reason = reason
        self.settled_at = now if now is not None else time.perf_counter()
        self.batch.settle_one()


class Batch:
    """The acks one revocation waits for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.acks: list[Ack] = []
        self._remaining = 0
        self._done: asyncio.Future[None] = loop.create_future()

    def expect(
        self, session: Session, space_id: str, seq: int, ranges: Sequence[AccessRange]
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


@dataclasses.dataclass(slots=True)
class _Job(Generic[T]):
    name: str
    run: Callable[[], Awaitable[T]]
    future: asyncio.Future[T]
    submitted: float


class SpaceQueue:
    """Runs one space's changes one at a time, in order, each to its end.

    `submit()` returns a future; callers await it through `run()`, which shields the job from
    the caller's cancellation: a cancelled RPC stops waiting, the change does not stop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, space_id: str) -> None:
        self.loop = loop
        self.space_id = space_id
        self._jobs: collections.deque[_Job[Any]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self.running: str | None = None
        self.history: collections.deque[Any] = collections.deque(maxlen=HISTORY)
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"<SpaceQueue {self.space_id} running={self.running!r} queued={len(self._jobs)} "
            f"history={len(self.history)}>"
        )

    @property
    def busy(self) -> bool:
        return self.running is not None or bool(self._jobs)

    def submit(self, name: str, run: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Queues `run` (a coroutine function); the future has its result or exception."""
        future: asyncio.Future[T] = self.loop.create_future()
        self._jobs.append(_Job(name, run, future, time.perf_counter()))
        if self._worker is None or self._worker.done():
            self._worker = self.loop.create_task(self._work())
        return future

    async def run(self, name: str, run: Callable[[], Awaitable[T]]) -> T:
        """Submits and waits; a cancellation of the caller leaves the job running."""
        future = self.submit(name, run)
        return await asyncio.shield(future)

    async def _work(self) -> None:
        while self._jobs:
            job = self._jobs.popleft()
            if job.future.done():
                continue
            self.running = job.name
            try:
                result = await job.run()
            except asyncio.CancelledError:
                # Only shutdown cancels the worker: fail this job and every queued one.
                job.future.cancel()
                for rest in self._jobs:
                    rest.future.cancel()
                self._jobs.clear()
                raise
            except BaseException as exc:  # handed to the waiting caller
                if not job.future.done():
                    job.future.set_exception(exc)
                    # Nobody may be waiting (a cancelled call): keep asyncio from warning.
                    job.future.exception()
            else:
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self.running = None

    def cancel(self) -> None:
        """Shutdown: stops the worker; queued jobs are cancelled."""
        self.closed = True
        if self._worker is not None:
            self._worker.cancel()
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()
