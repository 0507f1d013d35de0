"""Verification never fails open: an acknowledgement the kernel's view cannot confirm is
`unverified` (then fenced, or reported, per on_unverifiable), never counted as verified.

A /proc read that fails while the process lives cannot be caused from outside on this kernel (the
view's files are opened at Hello and stay readable), so the fault is made here by closing the
view's maps fd under a real broker core, with a real session socket and a real memfd space.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from membroker import wire
from membroker._sys import memfd as sys_memfd
from membroker._sys import mman
from membroker.v1 import session_pb2 as spb
from membrokerd.access import Access, AccessRange
from membrokerd.broker import Broker, Outcome
from membrokerd.config import load_config
from membrokerd.enforcement import FenceResult, Reach, still_reaches
from membrokerd.revocation import Ack, Batch, Verdict
from membrokerd.sessions import Session
from membrokerd.spaces import Attachment, BackingKind, Space

PAGE = 4096


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[Broker, Session, Space, socket.socket]]:
    loop = asyncio.new_event_loop()
    config = load_config(
        None,
        runtime_dir=tmp_path / "rt",
        audit_interval_s=0,
        fence_grace_ms=0,
        on_fenced_still_mapped="report",
    )
    broker = Broker(config, loop)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    broker.accept(ours)
    (conn,) = broker.sessions
    hello = spb.Frame(hello=spb.Hello(protocol_version=wire.PROTOCOL_VERSION, client_name="c"))
    broker.on_frame(conn, hello, [])
    session = broker.sessions[conn]
    assert session is not None and session.view is not None
    fd = sys_memfd.create_memfd("unverifiable", 16 * PAGE)
    st = os.fstat(fd)
    space = Space(
        name="s",
        fd=fd,
        size=16 * PAGE,
        backing=BackingKind.MEMFD,
        page_size=PAGE,
        owner="vmm",  # an owner with no session in this process: nothing is exempt
        owner_uid=os.getuid(),
        ephemeral=False,
        imported=False,
        regions=(),
        dev=st.st_dev,
        ino=st.st_ino,
    )
    broker.spaces[space.space_id] = space
    space.table.set_shared(0, 16 * PAGE)
    space.table.grant("c", 0, 4 * PAGE, Access.RW)
    session.attached[space.space_id] = Attachment.FD
    space.attachments[session.session_id] = Attachment.FD
    yield broker, session, space, theirs
    broker.shutdown("test over")
    theirs.close()
    loop.close()


def _break_view(session: Session) -> None:
    assert session.view is not None
    maps, pagemap, fd_dir = session.view._files
    os.close(maps)
    session.view._files = (-1, pagemap, fd_dir)  # every later read of the maps fails: EBADF


def test_a_view_that_cannot_be_read_is_unverified_never_verified(core):
    broker, session, space, _ = core
    gone = (AccessRange(PAGE, PAGE, Access.NONE),)
    space.table.revoke("c", PAGE, PAGE)
    judge = broker.judge(session, space.space_id, gone)
    assert broker.loop.run_until_complete(judge) == (Verdict.ACKED, "")
    assert session.view.last_mappings > 0  # looked at once: later looks walk it on the loop
    assert broker.judge_inline(session, space.space_id, gone) == (Verdict.ACKED, "")
    _break_view(session)
    # Both ways of looking: the walk on the loop and the maps text on a worker thread.
    for verdict, reason in (
        broker.judge_inline(session, space.space_id, gone),
        broker.judge_prepared(session, space.space_id, gone)(),
    ):
        assert verdict is Verdict.UNVERIFIED
        assert reason.startswith("its mappings could not be read (")
        assert "Bad file descriptor" in reason


@pytest.mark.parametrize("policy", ["fence", "report"])
def test_on_unverifiable_decides_what_follows(core, policy):
    broker, session, space, _ = core
    broker.config.on_unverifiable = policy
    _break_view(session)
    loop = broker.loop
    batch = Batch(loop)
    ack: Ack = batch.expect(session, space.space_id, 9, (AccessRange(0, PAGE, Access.NONE),))
    session.retain()
    verdict, reason = loop.run_until_complete(broker.judge(session, space.space_id, ack.ranges))
    ack.settle(verdict, reason)
    result = loop.run_until_complete(broker._conclude(space, ack))
    session.release()
    if policy == "report":
        assert result.outcome is Outcome.UNVERIFIED
        assert result.reason.startswith("acknowledged seq 9 but its mappings could not be read")
        assert broker.unverified_total == 1
        assert not session.conn.closed
    else:
        assert result.outcome is Outcome.FENCED
        assert result.reason.startswith("acknowledged seq 9 but its mappings could not be read")
        # Looked at again after the disconnect: this process does hold the memfd (the test
        # made it), and with on_fenced_still_mapped = report the result says so.
        assert "(on_unverifiable); still reached the space 0 ms after the disconnect" in (
            result.reason
        )
        assert "holds fd " in result.reason
        assert result.fence is FenceResult.STILL_MAPPED
        assert session.conn.closed
        assert broker.fenced_total == 1
        assert space.table.clients() == []


@pytest.mark.parametrize("policy", ["fence", "report"])
def test_an_audit_that_cannot_read_a_live_process_never_passes_it(core, policy):
    """The audit used to count a read error as "the process is gone" and move on."""
    broker, session, space, _ = core
    broker.config.on_unverifiable = policy
    assert broker.loop.run_until_complete(broker.enforcer.audit_space(space.space_id)) == []
    _break_view(session)
    fenced = broker.loop.run_until_complete(broker.enforcer.audit_space(space.space_id))
    assert broker.metrics.audit_unverified._value.get() == 1
    if policy == "report":
        assert fenced == [] and not session.conn.closed
    else:
        ((name, reason),) = fenced
        assert name == "c"
        assert reason.startswith(f"audit of {space.space_id}: its mappings could not be read (")
        broker.loop.run_until_complete(asyncio.sleep(0.05))  # fence_soon's task runs
        assert session.conn.closed and broker.fenced_total == 1


def test_a_fenced_process_whose_mappings_cannot_be_read_is_not_called_gone(core):
    """The look after a fence: alive and unreadable is "still reaches", never "let go"."""
    broker, session, space, _ = core
    spaces = [Reach(space.space_id, space.dev, space.ino, space.page_size)]
    space.table.forget_client("c")  # fenced: nothing allowed any more
    _break_view(session)
    problem = broker.loop.run_until_complete(still_reaches(broker, session, spaces))
    assert problem is not None
    assert problem.startswith(f"{space.space_id}: its mappings could not be read (")


def test_a_mapping_kept_past_a_revoke_is_caught_by_the_walk_and_by_the_text(core, monkeypatch):
    """The two ways a revocation is judged: the walk on the loop (a process looked at before,
    with few mappings) and the maps text on a worker thread (one with many: here, a walk
    limit below what this process has). Both find a mapping of the revoked page made anywhere
    in the process, not only where the client said it mapped."""
    import membrokerd.broker as broker_module
    from membroker._sys import mman
    from membroker._sys.proc import TooManyMappings

    broker, session, space, _ = core
    gone = (AccessRange(PAGE, PAGE, Access.NONE),)
    space.table.revoke("c", PAGE, PAGE)
    loop = broker.loop
    assert loop.run_until_complete(broker.judge(session, space.space_id, gone)) == (
        Verdict.ACKED,
        "",
    )
    kept = mman.Mapping.map_shared(space.fd, PAGE, mman.PROT_READ, PAGE)  # the revoked page
    try:
        verdict, reason = broker.judge_inline(session, space.space_id, gone)
        assert verdict is Verdict.CAUGHT
        assert reason.startswith("maps offset 0x1000 readable (r-s)")
        assert f"at {kept.address:#x}" in reason
        monkeypatch.setattr(broker_module, "INLINE_MAPPINGS", 3)
        assert broker.judge_inline(session, space.space_id, gone) is None  # a worker's, then
        with pytest.raises(TooManyMappings):
            session.view.walk_mappings_of(space.dev, space.ino, 3)
        assert session.view.last_mappings == 4  # the walk stopped there
        assert loop.run_until_complete(broker.judge(session, space.space_id, gone)) == (
            verdict,
            reason,
        )
    finally:
        kept.close()
    assert loop.run_until_complete(broker.judge(session, space.space_id, gone)) == (
        Verdict.ACKED,
        "",
    )


@contextlib.contextmanager
def holding_the_mmap_lock(size: int = 64 << 20) -> Iterator[None]:
    """A thread of this process that keeps taking its mmap lock for writing: mprotect of a
    populated shared mapping rewrites every PTE of it with the lock held, so a PROCMAP_QUERY
    of this process that meets it waits (sleeps) until it is done."""
    fd = sys_memfd.create_memfd("mmap-lock", size)
    mapping = mman.Mapping.map_shared(fd, size, mman.PROT_READ | mman.PROT_WRITE)
    os.close(fd)
    mapping.view(0, size)[:: mman.PAGE_SIZE] = bytes(size // mman.PAGE_SIZE)  # populate
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            mapping.protect(0, size, mman.PROT_READ)
            mapping.protect(0, size, mman.PROT_READ | mman.PROT_WRITE)

    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        mapping.close()


def test_a_process_whose_walk_slept_is_looked_at_on_a_worker_for_a_while(core, monkeypatch):
    """PROCMAP_QUERY waits for the process's mmap lock, which a process can hold for
    milliseconds (an mprotect of a large populated mapping): after a walk of it slept past
    SLOW_WALK_S, its acks are judged from the maps text on a worker thread for a pause that
    doubles with each such walk; then it is walked on the loop again. (Here SLOW_WALK_S is 0,
    so any walk that sleeps at all counts.)"""
    from membroker._sys.proc import ProcessView

    broker, session, space, _ = core
    view = session.view
    gone = (AccessRange(PAGE, PAGE, Access.NONE),)
    space.table.revoke("c", PAGE, PAGE)
    loop = broker.loop
    assert loop.run_until_complete(broker.judge(session, space.space_id, gone))[0] is Verdict.ACKED
    monkeypatch.setattr(ProcessView, "SLOW_WALK_S", 0.0)
    monkeypatch.setattr(ProcessView, "SLOW_WALK_PAUSE_S", 0.2)
    for _ in range(3):  # without a lock to wait for, no walk sleeps, however long it takes
        assert broker.judge_inline(session, space.space_id, gone) == (Verdict.ACKED, "")
    assert view.slow_walks == 0

    def walk_until_one_sleeps() -> float:
        with holding_the_mmap_lock():
            deadline = time.monotonic() + 10
            before = view.slow_walks
            while view.slow_walks == before and time.monotonic() < deadline:
                assert broker.judge_inline(session, space.space_id, gone) == (Verdict.ACKED, "")
            assert view.slow_walks == before + 1
            return time.monotonic()

    def metric(name: str, **labels: str) -> float:
        value = broker.metrics.registry.get_sample_value(name, labels)
        assert value is not None, name
        return value

    on_loop = metric("membroker_verify_seconds_count", where="loop")
    on_worker = metric("membroker_verify_seconds_count", where="worker")
    assert on_loop >= 3 and on_worker >= 1  # the walks above; the first look, from the text
    assert metric("membroker_slow_walks_total") == 0
    for pause in (0.2, 0.4):
        slept_at = walk_until_one_sleeps()
        assert metric("membroker_slow_walks_total") == view.slow_walks
        assert broker.judge_inline(session, space.space_id, gone) is None  # a worker's now
        assert loop.run_until_complete(broker.judge(session, space.space_id, gone)) == (
            Verdict.ACKED,
            "",
        )
        walks = view.slow_walks
        time.sleep(max(0.0, slept_at + pause * 0.5 - time.monotonic()))
        assert broker.judge_inline(session, space.space_id, gone) is None  # still paused
        time.sleep(max(0.0, slept_at + pause + 0.05 - time.monotonic()))
        assert broker.judge_inline(session, space.space_id, gone) == (Verdict.ACKED, "")
        assert view.slow_walks == walks  # walked again, and this walk did not sleep
    assert metric("membroker_verify_seconds_count", where="worker") == on_worker + 2
    assert metric("membroker_verify_seconds_count", where="loop") > on_loop
