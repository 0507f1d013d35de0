"""The SDK's session protocol against a broker played by the test over a real Unix socket.

`RawBroker` listens on session.sock in a temporary runtime directory and speaks raw frames to
the SDK's real `Session`: no daemon, no mocks. The SDK's gRPC channel to control.sock is lazy,
so a test that makes no control call needs no control server; the attach tests add a real gRPC
server (`FakeControl`) that answers Attach/Detach and sends the space's fd and access on the
session socket the way membrokerd does.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from membroker import session as session_mod
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker._sys.proc import ProcessView
from membroker.clients import FdClient, VaClient
from membroker.errors import SessionClosed
from membroker.session import Session
from membroker.types import Access, AccessRange
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import broker_pb2_grpc as pb_grpc
from membroker.v1 import session_pb2 as spb

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
SPACE = "sp-1"
WAIT = 5.0


class Peer:
    """The broker's end of one SDK session: sends and receives raw frames."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.conn.settimeout(WAIT)
        self.decoder = wire.FrameDecoder(16 * MiB)
        self.frames: list[spb.Frame] = []
        self._send_lock = threading.Lock()

    def send(self, frame: spb.Frame, fds: Sequence[int] = ()) -> None:
        self.send_raw(wire.encode(frame), fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        with self._send_lock:
            while view:
                sent = sys_sock.send_with_fds(self.conn, view, fds)
                view, fds = view[sent:], ()

    def next_frame(self, timeout: float = WAIT) -> spb.Frame:
        """The next frame the SDK sent (AssertionError if none comes in time)."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            assert left > 0, "the SDK sent no frame in time"
            self.conn.settimeout(left)
            data, fds, _ = sys_sock.recv_with_fds(self.conn, 1 << 16)
            assert data, "the SDK closed the session"
            for frame, frame_fds in self.decoder.feed(data, fds):
                for fd in frame_fds:
                    os.close(fd)
                self.frames.append(frame)
        return self.frames.pop(0)

    def expect(self, kind: str) -> spb.Frame:
        frame = self.next_frame()
        assert frame.WhichOneof("body") == kind, frame
        return frame

    def round_trip(self, nonce: int) -> None:
        """Pings and asserts the Pong is the very next frame: nothing else was sent before."""
        self.send(spb.Frame(ping=spb.Ping(nonce=nonce)))
        assert self.expect("pong").pong.nonce == nonce

    def read_until_eof(self, timeout: float = WAIT) -> None:
        """Reads to the end of the stream; the frames the SDK sent meanwhile go to `frames`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the SDK kept the socket open"
            self.conn.settimeout(left)
            try:
                data, fds, _ = sys_sock.recv_with_fds(self.conn, 1 << 16)
            except ConnectionResetError:
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            for frame, frame_fds in self.decoder.feed(data, fds):
                for fd in frame_fds:
                    os.close(fd)
                self.frames.append(frame)

    def close(self) -> None:
        self.conn.close()
        self.decoder.close()


class RawBroker:
    """Listens on <runtime_dir>/session.sock and answers each Hello with a Welcome."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(runtime_dir / "session.sock"))
        self.listener.listen(4)
        self.listener.settimeout(WAIT)
        self.sessions: list[Session] = []
        self.peers: list[Peer] = []

    def open(
        self, *, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME, after_welcome: bytes = b""
    ) -> tuple[Session, Peer]:
        """A real SDK Session connected to this broker, and the broker's end of it.

        after_welcome: bytes sent in the same write as the Welcome."""
        got: list[Peer] = []

        def handshake() -> None:
            conn, _ = self.listener.accept()
            peer = Peer(conn)
            hello = peer.expect("hello")
            assert hello.hello.protocol_version == wire.PROTOCOL_VERSION
            welcome = wire.encode(
                spb.Frame(
                    welcome=spb.Welcome(
                        session_id="s-1",
                        token="token",
                        protocol_version=wire.PROTOCOL_VERSION,
                        max_frame_bytes=max_frame_bytes,
                        broker_pid=os.getpid(),
                        page_size=PAGE,
                    )
                )
            )
            peer.send_raw(welcome + after_welcome)
            got.append(peer)

        thread = threading.Thread(target=handshake)
        thread.start()
        try:
            session = Session("client", self.runtime_dir, timeout=WAIT, calls="grpc")
        finally:
            thread.join(WAIT)
        self.sessions.append(session)
        self.peers.extend(got)
        return session, got[0]

    def close(self) -> None:
        for session in self.sessions:
            session.close()
            reader = session._reader
            assert reader is None or not reader.is_alive(), "the session's reader outlived it"
        for peer in self.peers:
            peer.close()
        self.listener.close()
        self.sessions.clear()
        # grpc frees a closed channel's poller fds only when the channel object is collected.
        gc.collect()


class Recorder:
    """A PushHandler that records what it is told; `fail` makes on_revoke raise with it."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.updates: list[tuple[int, list[AccessRange]]] = []
        self.revokes: list[tuple[int, list[AccessRange], bool, int]] = []
        self.closed: list[str] = []
        self.gate: threading.Event | None = None

    def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None:
        self.updates.append((seq, ranges))

    def on_revoke(
        self, seq: int, ranges: list[AccessRange], space_deleted: bool, deadline_ms: int = 0
    ) -> None:
        self.revokes.append((seq, ranges, space_deleted, deadline_ms))
        if self.gate is not None:
            self.gate.wait(WAIT)
        if self.fail is not None:
            raise RuntimeError(self.fail)

    def on_unpin_request(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def on_session_closed(self, reason: str) -> None:
        self.closed.append(reason)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes, which pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="mb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(runtime_dir: Path) -> Iterator[RawBroker]:
    raw = RawBroker(runtime_dir)
    yield raw
    raw.close()


def _install(session: Session, handler: Recorder, after_seq: int = 0) -> None:
    session._expect(SPACE)
    session._install(SPACE, handler, after_seq)


def _ranges(
    count: int, first: int = 0, access: spb.Access = spb.ACCESS_NONE
) -> list[spb.AccessRange]:
    """`count` one-page ranges, every other page from page `first`."""
    return [
        spb.AccessRange(offset=(first + 2 * i) * PAGE, length=PAGE, access=access)
        for i in range(count)
    ]


def _revoke(seq: int, ranges: list[spb.AccessRange], *, more: bool = False) -> spb.Frame:
    return spb.Frame(
        revoke=spb.Revoke(space_id=SPACE, seq=seq, ranges=ranges, deadline_ms=1000, more=more)
    )


def _wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# -- frame limits ------------------------------------------------------------------------------


def test_welcome_max_frame_bytes_lets_a_300k_revoke_through(
    broker: RawBroker, runtime_dir: Path
) -> None:
    session, peer = broker.open(max_frame_bytes=MiB)
    # The control channel is lazy: the session opened without any control.sock.
    assert not (runtime_dir / "control.sock").exists()
    assert session.max_frame_bytes == MiB
    handler = Recorder()
    _install(session, handler)
    ranges = _ranges(30_000, access=spb.ACCESS_RO)
    frame = _revoke(3, ranges)
    assert len(wire.encode(frame)) > 300_000

    peer.send(frame)

    ack = peer.expect("revoke_ack").revoke_ack
    assert (ack.space_id, ack.seq) == (SPACE, 3)
    assert len(handler.revokes) == 1
    seq, got, deleted, deadline = handler.revokes[0]
    assert (seq, len(got), deleted, deadline) == (3, 30_000, False, 1000)
    assert got[-1] == AccessRange(59_998 * PAGE, PAGE, Access.RO)
    assert not session.closed


def test_a_large_frame_glued_to_the_welcome_is_decoded_under_the_negotiated_limit(
    broker: RawBroker,
) -> None:
    """The handshake reads exactly the Welcome: the 300 KB frame behind it in the same write
    is left to the reader, which decodes it under the 1 MiB limit the Welcome announced."""
    frame = wire.encode(_revoke(2, _ranges(30_000, access=spb.ACCESS_RO)))
    assert len(frame) > 300_000
    session, peer = broker.open(max_frame_bytes=MiB, after_welcome=frame)
    # No handler: the revoke is acknowledged (nothing of that space is mapped here).
    assert peer.expect("revoke_ack").revoke_ack.seq == 2
    assert not session.closed


def test_decoder_tells_how_much_of_an_announced_frame_is_missing() -> None:
    decoder = wire.FrameDecoder(MiB)
    assert decoder.missing_bytes == 0
    decoder.feed(wire.HEADER.pack(300_000) + b"\0" * 1000, [])
    assert decoder.missing_bytes == 299_000
    decoder.close()


def test_recv_buffer_is_small_unless_a_large_frame_is_announced(broker: RawBroker) -> None:
    session, _ = broker.open(max_frame_bytes=4 * MiB)
    assert session._recv_size() == session_mod.SMALL_RECV_BYTES
    # The reader is idle (nothing is sent): feed its decoder the start of a large frame, as if
    # the reader had read it.
    frame = wire.encode(_revoke(1, _ranges(30_000)))
    session._decoder.feed(frame[:1000], [])
    assert session._recv_size() == len(frame) - 1000
    other, _ = broker.open(max_frame_bytes=4 * MiB)
    other._decoder.feed(wire.HEADER.pack(3 * MiB), [])
    assert other._recv_size() == session_mod.MAX_RECV_BYTES


# -- split pushes ------------------------------------------------------------------------------


def test_revoke_in_three_parts_is_torn_down_and_acked_once(broker: RawBroker) -> None:
    session, peer = broker.open()
    handler = Recorder()
    _install(session, handler)
    parts = [_ranges(100, first=0), _ranges(100, first=200), _ranges(50, first=400)]

    peer.send(_revoke(9, parts[0], more=True))
    peer.send(_revoke(9, parts[1], more=True))
    peer.round_trip(1)  # nothing answered the first two parts
    assert handler.revokes == []
    peer.send(_revoke(9, parts[2]))

    ack = peer.expect("revoke_ack").revoke_ack
    assert (ack.space_id, ack.seq) == (SPACE, 9)
    peer.round_trip(2)  # exactly one ack
    assert len(handler.revokes) == 1
    seq, got, _, _ = handler.revokes[0]
    want = [AccessRange(r.offset, r.length, Access.NONE) for part in parts for r in part]
    assert (seq, got) == (9, want)
    assert session._held_ranges == 0


def test_access_update_parts_are_applied_once_all_came(broker: RawBroker) -> None:
    """The handler sees one update (one re-plan, its seq only once all of it is known)."""
    session, peer = broker.open()
    handler = Recorder()
    _install(session, handler)
    for index, more in enumerate((True, True, False)):
        if index == 2:
            peer.round_trip(1)
            assert handler.updates == []  # two parts in: nothing applied yet
        peer.send(
            spb.Frame(
                access_update=spb.AccessUpdate(
                    space_id=SPACE,
                    seq=4,
                    ranges=_ranges(3, first=10 * index, access=spb.ACCESS_RW),
                    more=more,
                )
            )
        )
    peer.round_trip(1)
    assert [(seq, len(r)) for seq, r in handler.updates] == [(4, 9)]
    assert session._held_ranges == 0


def test_revoke_parts_without_end_close_the_session(
    broker: RawBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_mod, "MAX_PENDING_RANGES", 1_000)
    session, peer = broker.open()
    handler = Recorder()
    _install(session, handler)
    for seq in range(1, 12):  # the 11th part goes past 1,000 ranges
        peer.send(_revoke(seq, _ranges(100), more=True))

    peer.read_until_eof()
    _wait_until(lambda: session.closed)
    assert "more than 1000 ranges" in (session.closed_reason or "")
    assert handler.revokes == [] and handler.closed == [session.closed_reason]


# -- refusals ----------------------------------------------------------------------------------


def test_handler_that_raises_refuses_the_revoke_and_never_acks(broker: RawBroker) -> None:
    session, peer = broker.open()
    handler = Recorder(fail="mprotect: [Errno 12] Cannot allocate memory")
    _install(session, handler)

    peer.send(_revoke(5, _ranges(2), more=True))
    peer.send(_revoke(5, _ranges(2, first=8)))

    refused = peer.expect("revoke_refused").revoke_refused
    assert (refused.space_id, refused.seq) == (SPACE, 5)
    assert refused.reason == "mprotect: [Errno 12] Cannot allocate memory"
    peer.round_trip(1)  # and no RevokeAck after it
    assert len(handler.revokes) == 1 and not session.closed


def test_refusal_reason_is_cut_to_fit_a_frame(broker: RawBroker) -> None:
    session, peer = broker.open()
    _install(session, Recorder(fail="é" * 5000))
    peer.send(_revoke(5, _ranges(1)))
    reason = peer.expect("revoke_refused").revoke_refused.reason
    assert len(reason.encode()) <= session_mod.MAX_REASON_BYTES
    assert reason.startswith("éé") and reason.endswith("...")


def test_an_access_level_that_is_not_one_ends_the_session_and_reaches_no_handler(
    broker: RawBroker,
) -> None:
    """A revoke whose range carries access 7 (no such level): the SDK acknowledges nothing,
    calls no handler, and ends the session (no resume: a broker that says that is broken)
    with a reason naming the value."""
    session, peer = broker.open()
    handler = Recorder()
    _install(session, handler)
    peer.send(_revoke(4, [*_ranges(2), spb.AccessRange(offset=0, length=PAGE, access=7)]))  # type: ignore[arg-type]
    _wait_until(lambda: session.closed)
    assert "7 is not a valid Access" in (session.closed_reason or "")
    assert handler.revokes == [] and session.resume == 0
    peer.read_until_eof()
    assert [f.WhichOneof("body") for f in peer.frames] == []


def test_revoke_of_a_space_without_handler_is_acked(broker: RawBroker) -> None:
    _, peer = broker.open()
    peer.send(_revoke(2, _ranges(1)))
    ack = peer.expect("revoke_ack").revoke_ack
    assert (ack.space_id, ack.seq) == (SPACE, 2)


# -- the closed state --------------------------------------------------------------------------


def _undecodable() -> bytes:
    # Field 1, length-delimited, with a length varint that never ends: not a Frame.
    body = b"\x0a\xff\xff"
    return wire.HEADER.pack(len(body)) + body


def _over_the_limit() -> bytes:
    return wire.HEADER.pack(wire.DEFAULT_MAX_FRAME + 1) + b"\0" * 64


@pytest.mark.parametrize(
    ("data", "reason"),
    [(_undecodable(), "undecodable frame"), (_over_the_limit(), "exceeds the limit")],
    ids=["undecodable", "over_limit"],
)
def test_bad_frame_closes_the_session_and_wakes_waiters(
    broker: RawBroker, data: bytes, reason: str
) -> None:
    session, peer = broker.open()
    handler = Recorder()
    _install(session, handler)
    woken: list[BaseException] = []

    def wait_for_fd() -> None:
        try:
            session.take_fd(77, timeout=30)
        except BaseException as exc:
            woken.append(exc)

    waiter = threading.Thread(target=wait_for_fd)
    waiter.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    peer.send_raw(data)

    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert time.monotonic() - t0 < 2
    assert session.closed and reason in (session.closed_reason or "")
    assert isinstance(woken[0], SessionClosed) and reason in woken[0].reason
    assert handler.closed == [session.closed_reason]
    peer.read_until_eof()  # the SDK shut its end down
    with pytest.raises(SessionClosed, match=reason):
        session.ping()


def test_unexpected_error_in_the_reader_closes_the_session(broker: RawBroker) -> None:
    session, peer = broker.open()

    class Exits(Recorder):
        def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None:
            raise SystemExit("handler called sys.exit() on the session thread")

    _install(session, Exits())
    peer.send(spb.Frame(access_update=spb.AccessUpdate(space_id=SPACE, seq=1)))

    _wait_until(lambda: session.closed)
    assert session.closed_reason == (
        "session reader failed: SystemExit: handler called sys.exit() on the session thread"
    )
    peer.read_until_eof()


def test_fenced_goodbye_is_what_the_next_send_reports(broker: RawBroker) -> None:
    session, peer = broker.open()
    peer.send(spb.Frame(goodbye=spb.Goodbye(reason="x", fenced=True)))
    peer.conn.shutdown(socket.SHUT_RDWR)
    peer.conn.close()

    with pytest.raises(SessionClosed) as caught:
        session.ping()
    assert caught.value.fenced and caught.value.reason == "fenced: x"
    assert "x" in str(caught.value) and session.fenced


def _fenced_in_a_handler(session: Session, peer: Peer) -> Recorder:
    """The broker pushes revoke seq 3 and, while the session's reader waits in on_revoke
    (until the returned handler's gate is set), fences the session and closes its end."""
    handler = Recorder()
    handler.gate = threading.Event()
    _install(session, handler)
    peer.send(_revoke(3, _ranges(1)))
    _wait_until(lambda: len(handler.revokes) == 1)  # the reader now waits in on_revoke
    peer.send(spb.Frame(goodbye=spb.Goodbye(reason="did not acknowledge seq 3", fenced=True)))
    peer.conn.close()
    return handler


def test_send_failing_before_the_goodbye_is_read_still_reports_the_fencing(
    broker: RawBroker,
) -> None:
    """The reader is busy in a handler when the broker fences and closes: the application's
    send fails with EPIPE first, and must still learn that it was fenced and why."""
    session, peer = broker.open()
    handler = _fenced_in_a_handler(session, peer)
    threading.Timer(0.1, handler.gate.set).start()  # type: ignore[union-attr]

    t0 = time.monotonic()
    with pytest.raises(SessionClosed) as caught:
        session.ping()
    assert time.monotonic() - t0 < 1.5
    assert caught.value.fenced
    assert caught.value.reason == "fenced: did not acknowledge seq 3"
    _wait_until(lambda: session._reader is not None and not session._reader.is_alive())


def test_a_session_socket_past_fd_1024_still_reads_the_last_word(broker: RawBroker) -> None:
    """A process with many files open (a VMM) gets a session socket numbered 1024 or more.
    The reader is in a handler when the broker fences and closes; the handler's ack then fails
    to send, and the reader reads on for the broker's last word: with select() that fd number
    raised ValueError, and the session ended as a failed reader instead of as fenced."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        session, peer = broker.open()
    finally:
        for fd in fillers:
            os.close(fd)
    try:
        assert session._sock.fileno() >= 1024
        handler = _fenced_in_a_handler(session, peer)
        handler.gate.set()  # type: ignore[union-attr]
        _wait_until(lambda: session.closed)
        assert session.fenced
        assert session.closed_reason == "fenced: did not acknowledge seq 3"
    finally:
        session.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_error_frame_reason_survives_the_broken_pipe(broker: RawBroker) -> None:
    session, peer = broker.open()
    peer.send(spb.Frame(error=spb.Error(code=3, message="frame of 9 fds")))
    peer.conn.close()
    with pytest.raises(SessionClosed, match="broker error 3: frame of 9 fds") as caught:
        session.ping()
    assert not caught.value.fenced


# -- attaching: access from the reply or from the session socket -------------------------------


class FakeControl(pb_grpc.MemBrokerServicer):
    """A real gRPC control server that answers Attach like membrokerd: the fd and, when asked,
    the access snapshot go on the session socket before the reply."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.memfd = os.memfd_create("space", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 4 * MiB)
        self.snapshot: list[list[spb.AccessRange]] = []
        self.inline: list[spb.AccessRange] = []
        self.before_reply: list[spb.Frame] = []
        self.seq = 5

    def Attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachResponse:
        assert self.peer is not None
        self.peer.send(
            spb.Frame(fd_delivery=spb.FdDelivery(tag=7, space_id=request.space_id)), [self.memfd]
        )
        for index, part in enumerate(self.snapshot):
            more = index < len(self.snapshot) - 1
            self.peer.send(
                spb.Frame(
                    access_update=spb.AccessUpdate(
                        space_id=request.space_id,
                        seq=self.seq,
                        ranges=part,
                        more=more,
                        snapshot=True,
                    )
                )
            )
        for frame in self.before_reply:
            self.peer.send(frame)
        space = pb.Space(
            space_id=request.space_id, size=4 * MiB, backing=pb.BACKING_MEMFD, page_size=PAGE
        )
        return pb.AttachResponse(
            space=space,
            fd_tag=7,
            seq=self.seq,
            ranges=self.inline,
            ranges_on_session=bool(self.snapshot),
            va_mode=pb.VA_MODE_COOPERATIVE,
            writable=True,
        )

    def Detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachResponse:
        return pb.DetachResponse()


@pytest.fixture
def control(runtime_dir: Path) -> Iterator[FakeControl]:
    servicer = FakeControl()
    executor = futures.ThreadPoolExecutor(max_workers=2)
    server = grpc.server(executor)
    pb_grpc.add_MemBrokerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{runtime_dir / 'control.sock'}")
    server.start()
    yield servicer
    server.stop(0).wait(WAIT)
    executor.shutdown(wait=True)
    os.close(servicer.memfd)
    del server
    # grpc frees its pollers' fds only when its objects are collected.
    gc.collect()


GRANTED = [
    spb.AccessRange(offset=0, length=64 * 1024, access=spb.ACCESS_RW),
    spb.AccessRange(offset=MiB, length=PAGE, access=spb.ACCESS_RO),
    spb.AccessRange(offset=2 * MiB, length=2 * PAGE, access=spb.ACCESS_RW),
]


@pytest.mark.parametrize("where", ["on_session", "inline"])
def test_attach_takes_its_access_from_the_session_or_the_reply(
    broker: RawBroker, control: FakeControl, where: str
) -> None:
    session, peer = broker.open()
    control.peer = peer
    if where == "on_session":
        control.snapshot = [[r] for r in GRANTED]  # three parts, the last without `more`
    else:
        control.inline = GRANTED
    control.before_reply = [
        # Newer than the attach: replayed once the handler is installed.
        spb.Frame(
            access_update=spb.AccessUpdate(
                space_id=SPACE,
                seq=6,
                ranges=[spb.AccessRange(offset=3 * MiB, length=PAGE, access=spb.ACCESS_RO)],
            )
        ),
        # At the attach's seq: already in what the attach says, acknowledged as is.
        spb.Frame(revoke=spb.Revoke(space_id=SPACE, seq=5, ranges=_ranges(1, first=900))),
    ]

    va = session.attach_va(SPACE)
    try:
        assert peer.expect("mapped").mapped.length == 4 * MiB
        assert peer.expect("revoke_ack").revoke_ack.seq == 5
        assert va.ranges() == [
            AccessRange(0, 64 * 1024, Access.RW),
            AccessRange(MiB, PAGE, Access.RO),
            AccessRange(2 * MiB, 2 * PAGE, Access.RW),
            AccessRange(3 * MiB, PAGE, Access.RO),
        ]
        assert va.seq == 6
        va.write(2 * MiB, b"through the mapping")
        assert os.pread(control.memfd, 19, 2 * MiB) == b"through the mapping"
        assert session._held_ranges == 0

        peer.send(_revoke(7, [spb.AccessRange(offset=2 * MiB, length=2 * PAGE)]))
        assert peer.expect("revoke_ack").revoke_ack.seq == 7
        assert not va.holds(2 * MiB, PAGE)
    finally:
        va.close()


def test_fd_client_whose_on_revoke_raises_refuses(broker: RawBroker, control: FakeControl) -> None:
    session, peer = broker.open()
    control.peer = peer
    control.inline = GRANTED

    def stuck(ranges: list[AccessRange]) -> None:
        raise RuntimeError("DMA engine did not stop")

    client = session.attach_fd(SPACE, on_revoke=stuck)
    try:
        assert isinstance(client, FdClient)
        peer.send(_revoke(6, [spb.AccessRange(offset=0, length=PAGE)]))
        refused = peer.expect("revoke_refused").revoke_refused
        assert refused.seq == 6
        want = f"on_revoke of {SPACE} raised RuntimeError: DMA engine did not stop"
        assert refused.reason == want
        peer.round_trip(1)
        assert not client.holds(0, PAGE)  # the local view never claims what may be gone
    finally:
        client.close()


def test_va_client_notification_that_raises_still_tears_down_and_acks(
    broker: RawBroker, control: FakeControl
) -> None:
    session, peer = broker.open()
    control.peer = peer
    control.inline = GRANTED

    def noisy(ranges: list[AccessRange]) -> None:
        raise RuntimeError("logging backend down")

    va = session.attach_va(SPACE, on_revoke=noisy)
    try:
        peer.expect("mapped")
        peer.send(_revoke(6, [spb.AccessRange(offset=0, length=64 * 1024)]))
        assert peer.expect("revoke_ack").revoke_ack.seq == 6
        assert not va.holds(0, PAGE)
        # The kernel's view: those pages are guard markers now (the chunk holds others).
        view = ProcessView(os.getpid())
        try:
            assert view.first_unguarded(va.address, 64 * 1024 // PAGE) is None
            assert view.first_unguarded(va.address + MiB, 1) == 0
        finally:
            view.close()
    finally:
        va.close()


def test_va_client_whose_teardown_fails_refuses(broker: RawBroker, control: FakeControl) -> None:
    session, peer = broker.open()
    control.peer = peer
    control.inline = GRANTED
    va = session.attach_va(SPACE)
    try:
        assert isinstance(va, VaClient)
        peer.expect("mapped")
        va.mapping.close()  # behind the client's back: its mprotect can no longer run

        peer.send(_revoke(6, [spb.AccessRange(offset=0, length=64 * 1024)]))

        refused = peer.expect("revoke_refused").revoke_refused
        assert refused.seq == 6
        assert refused.reason.startswith(f"tearing down 1 range(s) of {SPACE} failed: ")
        peer.round_trip(1)
        assert not va.holds(0, PAGE)
    finally:
        va.close()


def test_a_sealed_teardown_of_many_ranges_zaps_around_what_is_held() -> None:
    """The plan a sealed VaClient zaps by (`_zap_spans`, after the ranges are recorded): a
    revoke of 1,000 fragments that leaves nothing held is one span over them all; with two
    held pages in between, the three gaps around them; with as many held as revoked (every
    other page kept), span by span; a batch under ZAP_AROUND_MIN, span by span."""
    from membroker.clients import ZAP_AROUND_MIN
    from membroker.rangeset import RangeSet

    va = object.__new__(VaClient)  # only its readable set is consulted
    revoked = [(2 * i, 2 * i + 1) for i in range(1_000)]
    va._readable = RangeSet()
    assert va._zap_spans(revoked) == [(0, 1_999)]
    va._readable = RangeSet([(501, 502), (703, 704)])
    assert va._zap_spans(revoked) == [(0, 501), (502, 703), (704, 1_999)]
    va._readable = RangeSet((2 * i + 1, 2 * i + 2) for i in range(1_000))
    assert va._zap_spans(revoked) == revoked
    few = revoked[: ZAP_AROUND_MIN - 1]
    va._readable = RangeSet()
    assert va._zap_spans(few) == few


@pytest.mark.parametrize("revoked_count", [3, 100_000])
def test_a_revocation_releases_exactly_the_pins_it_overlaps(revoked_count: int) -> None:
    """FdClient's teardown releases the pins that overlap a revoked range and keeps the others
    (one ending where a revoked range starts, one in a gap, one past them all), the same with
    a few ranges (pairwise) as with 100,000 against 40 pins (a set of the ranges, one lookup
    per pin: pairwise, 40 pins not overlapping a million ranges took seconds, past the
    deadline)."""
    from membroker.clients import Pin
    from membroker.rangeset import PAIRWISE_MAX

    fd = object.__new__(FdClient)  # only its pins are consulted
    revoked = [AccessRange(2 * i * PAGE, PAGE, Access.NONE) for i in range(revoked_count)]
    last = 2 * (revoked_count - 1) * PAGE
    pins = {  # the revoked ranges are the even pages
        "in the first": (0, PAGE),
        "across a gap": (PAGE + PAGE // 2, PAGE),  # from the middle of page 1 into page 2
        "in a gap": (PAGE, PAGE),
        "ends where one starts": (3 * PAGE, PAGE),
        "in the last": (last, PAGE),
        "past them all": (last + PAGE, 4 * PAGE),
    }
    for i in range(34):  # more that sit in gaps, for the large case's pair count
        pins[f"gap {i}"] = ((2 * i + 1) * PAGE, PAGE)
    fd._pins = {i: Pin(fd, i, off, n, False) for i, (off, n) in enumerate(pins.values())}
    names = dict(enumerate(pins))
    if revoked_count > 3:
        assert len(fd._pins) * len(revoked) > PAIRWISE_MAX
    held = dict(fd._pins)
    fd._teardown(revoked)
    released = {names[i] for i, pin in held.items() if pin.released}
    assert released == {"in the first", "across a gap", "in the last"}
    assert {names[i] for i in fd._pins} == set(pins) - released


def test_status_code_names_are_grpcs() -> None:
    """The SDK names status codes without importing grpc (membroker.errors): the same numbers
    and names as grpc.StatusCode, and an error's `code` is grpc's."""
    import grpc

    from membroker.errors import CODE_NAMES, NotFound, from_status

    assert {code.value[0]: code.name for code in grpc.StatusCode} == CODE_NAMES
    error = from_status(5, "no such space", "GetSpace", None)
    assert isinstance(error, NotFound) and error.code is grpc.StatusCode.NOT_FOUND
    assert from_status(99, "?", "GetSpace", None).code is grpc.StatusCode.UNKNOWN
