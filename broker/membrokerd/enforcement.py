"""Enforcement: fencing a client and checking, with the kernel, what fencing achieved.

Used by the broker core (revocations, audits, pins). Fencing closes the session, drops the
client's grants and, per `fence_action`, kills the process through the pidfd taken at accept.
Then it looks again: a client that still maps or holds a space after `fence_grace_ms` is killed
(`on_fenced_still_mapped = "kill"`, the default) or reported as still mapping. The result says
exactly which: never a bare "fenced".
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import select
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from membroker._sys import sock as sys_sock
from membroker.v1 import session_pb2 as spb
from membrokerd.pushes import without_collector
from membrokerd.verify import Allowed, check_reach

if TYPE_CHECKING:
    from membrokerd.broker import Broker
    from membrokerd.sessions import Session

log = logging.getLogger("membrokerd.enforcement")

# How long a killed process may take to be gone before the report says so anyway.
KILL_WAIT_S = 2.0
POLL_S = 0.01
# How long a process whose memory is gone may take to be seen exited (`gone_soon`).
EXITING_S = 0.2


class FenceResult(enum.Enum):
    """What fencing did, checked against the kernel afterwards."""

    DISCONNECTED = "disconnected"  # closed; the process maps and holds nothing of the space
    KILLED = "killed"  # SIGKILLed through its pidfd, and it has exited
    STILL_MAPPED = "still_mapped"  # closed, but it still maps or holds the space
    EXITED = "exited"  # the process had already exited


@dataclasses.dataclass(frozen=True, slots=True)
class Fenced:
    result: FenceResult
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reach:
    """A space the fenced session was attached to: what to look for in the process."""

    space_id: str
    dev: int
    ino: int
    page: int


def is_alive(session: Session) -> bool:
    """Whether the session's process is still running (by its pidfd, never its pid)."""
    if session.pidfd < 0:
        return False  # released: nothing of it is being looked at any more
    try:
        return sys_sock.pidfd_is_alive(session.pidfd)
    except OSError:
        return False


async def gone_soon(session: Session) -> bool:
    """Whether the process is gone, or exits within EXITING_S: one that is exiting has no
    memory any more (/proc reads of it fail with ESRCH) a moment before its pidfd says it
    exited. A look that failed is put down to dying rather than to hiding only after this."""
    deadline = time.monotonic() + EXITING_S
    while is_alive(session):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Whether the process behind `pidfd` exited within `timeout` (blocks: use briefly)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


async def _wait_exit(pidfd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if wait_exit(pidfd, 0):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)


def kill(session: Session) -> str | None:
    """SIGKILL through the session's pidfd; None if sent, else why not."""
    try:
        sys_sock.pidfd_send_signal(session.pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return "the process had already exited"
    except OSError as exc:
        return f"SIGKILL failed: {exc}"
    return None


async def still_reaches(broker: Broker, session: Session, spaces: list[Reach]) -> str | None:
    """What of `spaces` the (fenced, disconnected, detached) process still maps or holds
    beyond what its other sessions may (an owner's process sharing it keeps the space), if
    anything.

    What it may hold is read on the loop; the kernel's view on a worker thread: the maps text
    of a process with tens of thousands of mappings takes tens of milliseconds to read, and
    a hostile client must not stall the loop with it (once per poll of a fence's grace)."""
    view = session.view
    if view is None:
        return None
    session.retain()  # the view stays open while a worker reads it
    try:
        for r in spaces:
            allowed, fd_allowed = Allowed.nothing(), False
            space = broker.spaces.get(r.space_id)
            if space is not None:
                allowance = broker.allowance(session, space, None)
                if allowance is None:
                    continue
                allowed, fd_allowed = allowance
            look = functools.partial(
                without_collector(check_reach),
                view,
                r.dev,
                r.ino,
                allowed,
                r.page,
                None,
                fd_allowed=fd_allowed,
            )
            try:
                problem = await broker.loop.run_in_executor(None, look)
            except OSError as exc:
                if await gone_soon(session):
                    return None  # gone meanwhile: it reaches nothing
                # Alive but unreadable: nothing says it let go, so it still reaches.
                return f"{r.space_id}: its mappings could not be read ({exc})"
            if problem is not None:
                return f"{r.space_id}: {problem}"
        return None
    finally:
        session.release()


class Enforcer:
    """Fences sessions for the broker; one fencing per session, however many ask."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def fence(
        self, session: Session, kind: str, reason: str, also: Sequence[Reach] = ()
    ) -> Fenced:
        """Fences `session` (or joins the fencing already under way) and reports the result.
        `also`: spaces to look for afterwards besides those it is attached to (one it just
        detached from)."""
        if session.fencing is None:
            session.fencing = self.broker.loop.create_future()
            session.retain()
            try:
                spaces = self._begin(session, kind, reason) + list(also)
                # The grants' drop went to the journal's change log in _begin (the broker's).
                outcome = await self._follow_up(session, reason, spaces)
            except BaseException as exc:
                session.fencing.set_exception(exc)
                session.fencing.exception()
                raise
            finally:
                session.release()
            # Every result counts, disconnected and exited too (the metric's help lists them).
            self.broker.metrics.fence_results.labels(outcome.result.value).inc()
            session.fencing.set_result(outcome)
            return outcome
        return await asyncio.shield(session.fencing)

    def fence_soon(
        self, session: Session, kind: str, reason: str, also: Sequence[Reach] = ()
    ) -> None:
        """Fences without waiting for the follow-up (audits, pins): the disconnect and the grant
        drop happen now, the check afterwards runs on its own."""
        self.broker.spawn(self.fence(session, kind, reason, also))

    def _begin(self, session: Session, kind: str, reason: str) -> list[Reach]:
        """The immediate part: count, kill if configured, say why, close, drop grants."""
        broker = self.broker
        spaces = [
            Reach(s.space_id, s.dev, s.ino, s.page_size)
            for s in (broker.spaces.get(i) for i in session.attached)
            if s is not None
        ]
        broker.fenced_total += 1
        broker.metrics.fenced.labels(kind).inc()
        session.killed = None
        if broker.config.fence_action == "kill":
            session.killed = kill(session) or "killed"
        log.warning(
            "fencing client %r (session %s, pid %d): %s",
            session.name,
            session.session_id,
            session.pid,
            reason,
        )
        # The Goodbye goes after what the client's socket already holds, ahead of anything
        # still queued here: a client behind in reading learns it was fenced, and why.
        session.conn.close(
            f"fenced: {reason}", spb.Frame(goodbye=spb.Goodbye(reason=reason, fenced=True))
        )
        for space in broker.spaces.values():
            # A lowering of a client with no session left: nobody to tell, nothing to wait for.
            space.table.forget_client(session.name)
        return spaces

    async def _follow_up(self, session: Session, reason: str, spaces: list[Reach]) -> Fenced:
        config = self.broker.config
        if session.killed is not None:
            if session.killed != "killed":
                return Fenced(FenceResult.EXITED, f"{reason}; {session.killed}")
            if await _wait_exit(session.pidfd, KILL_WAIT_S):
                return self._report(Fenced(FenceResult.KILLED, f"{reason}; killed with SIGKILL"))
            return self._report(
                Fenced(
                    FenceResult.STILL_MAPPED,
                    f"{reason}; SIGKILL sent but the process had not exited after "
                    f"{KILL_WAIT_S:g} s",
                )
            )
        if not is_alive(session):
            return Fenced(FenceResult.EXITED, f"{reason}; the process has exited")
        if session.view is None:
            return Fenced(
                FenceResult.DISCONNECTED,
                f"{reason}; disconnected (not verified: no view of the process)",
            )
        # Give a compliant client the grace to drop what it maps once it reads the Goodbye.
        deadline = time.monotonic() + config.fence_grace_ms / 1000
        while True:
            if not is_alive(session):
                return Fenced(FenceResult.EXITED, f"{reason}; the process has exited")
            problem = await still_reaches(self.broker, session, spaces)
            if problem is None:
                return Fenced(FenceResult.DISCONNECTED, f"{reason}; disconnected")
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)
        after = (
            f"still reached the space {config.fence_grace_ms} ms after the disconnect ({problem})"
        )
        if config.on_fenced_still_mapped == "report":
            return self._report(Fenced(FenceResult.STILL_MAPPED, f"{reason}; {after}"))
        failed = kill(session)
        if failed is not None and not is_alive(session):
            return Fenced(FenceResult.EXITED, f"{reason}; {after}; {failed}")
        if failed is None and await _wait_exit(session.pidfd, KILL_WAIT_S):
            return self._report(Fenced(FenceResult.KILLED, f"{reason}; {after}: killed"))
        return self._report(
            Fenced(FenceResult.STILL_MAPPED, f"{reason}; {after}; {failed or 'SIGKILL pending'}")
        )

    def _report(self, outcome: Fenced) -> Fenced:
        log.warning("fence result: %s: %s", outcome.result.value, outcome.reason)
        return outcome

    # -- audits ------------------------------------------------------------------------------

    async def audit_space(self, space_id: str) -> list[tuple[str, str]]:
        """Compares every attached client's mappings of one space with what it holds (run as a
        job of the space's queue, so no change is half done); fences who reaches more. The
        kernel's view is read and compared on a worker thread: a client with a million
        fragments does not hold up the event loop."""
        broker = self.broker
        space = broker.spaces.get(space_id)
        if space is None or space.deleting:
            return []
        fenced = []
        for session_id in list(space.attachments):
            session = broker.session_by_id(session_id)
            if session is None or session.conn.closed or session.view is None:
                continue
            if broker.still_mapping(session, space_id):
                # Mid-attach, a page it does not hold may be accessible for a moment (before
                # its guard marker goes in); the next audit sees the finished mapping, and one
                # that never reports Mapped is judged once the deadline has passed.
                continue
            allowance = broker.allowance(session, space, None)
            if allowance is None:
                continue  # the owner's own process maps the whole space by right
            allowed, fd_allowed = allowance
            view = session.view
            session.retain()  # the view stays open while the worker reads it
            try:
                problem = await broker.loop.run_in_executor(
                    None,
                    functools.partial(
                        without_collector(check_reach),
                        view,
                        space.dev,
                        space.ino,
                        allowed,
                        space.page_size,
                        None,
                        check_present=True,
                        fd_allowed=fd_allowed,
                    ),
                )
            except OSError as exc:
                if await gone_soon(session):
                    continue  # gone: on_closed releases it
                # Alive, and its mappings cannot be read: never "nothing found".
                problem = f"its mappings could not be read ({exc})"
                broker.metrics.audit_unverified.inc()
                if broker.config.on_unverifiable == "report":
                    log.warning(
                        "audit of %s: client %r (pid %d): %s (on_unverifiable = report)",
                        space_id,
                        session.name,
                        session.pid,
                        problem,
                    )
                    continue
            finally:
                session.release()
            if problem is not None and not session.conn.closed:
                reason = f"audit of {space_id}: {problem}"
                self.fence_soon(session, "audit", reason)
                fenced.append((session.name, reason))
        return fenced
