"""The SDK's session: one connection to membrokerd's session socket plus the gRPC control channel.

`Session` opens session.sock, says Hello, and keeps a background thread that serves the broker's
pushes (fd deliveries, access updates, revocations) promptly even while the application's own
threads are busy. Control calls (`call`) travel as Call frames on the session's call channel (a
socketpair handed to the broker at the first call, whose answers the calling thread reads
itself), on the session socket while another thread uses the channel, or over gRPC with the
session token as metadata (calls="grpc"). Owner operations live here; attaching returns a
`VaClient` or `FdClient` (membroker.clients).

Pushes too large for one frame come in parts (`more`): the reader collects the parts of an
AccessUpdate or a Revoke so that the handler sees the whole change once (and, for a Revoke,
tears down and the session acknowledges once). A revocation whose teardown failed is never
acknowledged: the handler raises, and the session sends `RevokeRefused` with the reason
instead. A handler that gave up ranges it still holds (it could not keep using them safely)
says so with `report_withdrawn`; they travel with the next acknowledgement of that space and
the owner's report lists them. So do buffers its device had been offered in revoked memory and
will never touch (`report_in_flight`), and a client whose isolation of a space is logical only
(a backend it serves keeps fds of the whole space) says so with `declare_isolation`. The
session is closed, with a reason and every waiter woken, by the broker (EOF, `Goodbye`,
`Error`), by `close()`, or by anything that goes wrong in the reader; a send that fails
first reads the broker's last frame, so a fenced client learns that it was fenced and why.

Resuming: a connection that ends without the broker's Error or a fence (the broker crashed,
restarts or upgrades: EOF, or a Goodbye with `restarting`) is not the end of the session. The
reader reconnects with backoff for up to `resume` seconds, says Hello with the resume token of
the last Welcome (bound by the broker to this process, its uid and client name), and once
welcomed back each attachment re-binds itself (`on_resumed`, on a thread of its own) while the
reader serves the pushes that re-synchronise it. Meanwhile every call fails at once with
`BrokerRestarting` (retryable), including those whose connection went while they waited. A
resume that is refused or times out ends the session like any other end.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.errors import (
    BrokerBusy,
    BrokerError,
    BrokerRestarting,
    ConnectError,
    MembrokerError,
    ProtocolError,
    ResourceExhausted,
    SessionClosed,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
    from_status,
)
from membroker.types import (
    AccessRange,
    Region,
    RevocationReport,
    SpaceInfo,
    access_of,
    backing_of,
    on_pinned_pb,
)
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb

log = logging.getLogger("membroker")

TOKEN_KEY = "membroker-session-token"
DEFAULT_TIMEOUT = 30.0
# Bytes a Call frame adds to its request body (id, method name, framing), at most.
CALL_OVERHEAD = 128
# Method name -> its response message class, for calls answered on the session socket.
_RESPONSES: dict[str, Any] = {
    m.name: getattr(pb, m.output_type.name)
    for m in pb.DESCRIPTOR.services_by_name["MemBroker"].methods
}
# The largest frame the SDK accepts whatever the broker announces (the daemon's own ceiling).
MAX_FRAME_CEILING = 16 * 1024 * 1024
# The reader's recvmsg buffer. Python allocates the full size on every recvmsg: 64 KiB costs
# ~2 us, 256 KiB or more ~13 us (the allocation goes to mmap). So small frames are read into
# at most 64 KiB, and only a large frame already announced by its header gets a larger read,
# up to the frame's size and at most this cap.
SMALL_RECV_BYTES = wire.DEFAULT_MAX_FRAME + wire.HEADER.size
MAX_RECV_BYTES = 1024 * 1024
# Ranges the reader holds at once in pushes not yet handed over: revoke parts waiting for their
# last part, pushes buffered for an attach in flight, attach snapshots. A broker that goes past
# it (say, `more` parts without end) breaks the protocol and the session is closed.
MAX_PENDING_RANGES = 4_000_000
# How long a failed send waits for the broker's last frame (Goodbye, Error) to be read.
LAST_WORDS_WAIT = 0.5
# A refusal's reason is cut to this many UTF-8 bytes: with the rest of RevokeRefused it fits
# in the smallest frame a broker may announce (1 KiB).
MAX_REASON_BYTES = 512
# Withdrawn ranges carried by one acknowledgement (each costs at most 24 bytes of the frame).
MAX_WITHDRAWN_RANGES = 32
# In-flight buffer ranges carried by one acknowledgement (the broker takes at most 64).
MAX_IN_FLIGHT_RANGES = 32
# An isolation note is cut to this many UTF-8 bytes (the broker refuses more than 256).
MAX_ISOLATION_NOTE_BYTES = 256
# Seconds a session keeps trying to resume after its connection is lost (a broker restart or
# upgrade), and the backoff between attempts.
DEFAULT_RESUME = 30.0
RESUME_FIRST_PAUSE = 0.01
RESUME_MAX_PAUSE = 0.1
# Error codes of a refused resume that are worth another try (UNAVAILABLE: the broker is busy).
_RETRY_CODES = frozenset({14})


def default_runtime_dir() -> Path:
    """$MEMBROKER_RUNTIME_DIR, else the daemon's default for this user."""
    env = os.environ.get("MEMBROKER_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/membroker")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "membroker" if xdg else Path("/tmp") / f"membroker-{os.geteuid()}"


class PushHandler(Protocol):
    """What an attachment does with the pushes of its space (called on the session thread).

    `on_revoke` returns only once the ranges are torn down; the session then acknowledges. If
    it raises, the ranges are NOT torn down: the session refuses the revocation
    (`RevokeRefused`, the exception's message as the reason) and the broker fences or reports.
    An exception from `on_access_update` is logged; access stays as low as it was.
    """

    def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None: ...

    def on_revoke(
        self, seq: int, ranges: list[AccessRange], space_deleted: bool, deadline_ms: int = 0
    ) -> None: ...

    def on_unpin_request(self, ranges: list[tuple[int, int]]) -> None: ...

    def on_session_closed(self, reason: str) -> None: ...


@dataclasses.dataclass(slots=True)
class _Push:
    """One access change of a space (every part of it, for a revoke), as the reader got it."""

    space_id: str
    seq: int
    ranges: list[AccessRange]
    revoke: bool
    space_deleted: bool = False
    deadline_ms: int = 0


@dataclasses.dataclass(slots=True)
class _Pending:
    """What arrives for a space being attached, held until its handler is installed."""

    pushes: list[_Push] = dataclasses.field(default_factory=list)
    # The attach snapshot (AccessUpdate with `snapshot`): its seq, its ranges so far, and
    # whether its last part (the one without `more`) came.
    snapshot_seq: int = -1
    snapshot: list[AccessRange] = dataclasses.field(default_factory=list)
    snapshot_done: bool = False
    # A read-write fd that upgraded the attachment before its handler was installed (-1: none)
    new_fd: int = -1

    @property
    def held_ranges(self) -> int:
        return sum(len(p.ranges) for p in self.pushes) + len(self.snapshot)


def _answer(result: spb.CallResult, response_class: Any, method: str, request: Any) -> Any:
    """A CallResult as the method's response, or its typed error."""
    if result.code:
        raise from_status(result.code, result.message, method, request)
    return response_class.FromString(result.body)


def _deadline_exceeded(method: str, request: Any) -> BrokerError:
    return BrokerError(
        "deadline exceeded waiting for the broker's answer "
        "(a change it started runs to its end in the broker)",
        method=method,
        request=request,
        code="DEADLINE_EXCEEDED",
    )


def _replace_fd(old: int, new: int) -> int:
    if old >= 0:
        os.close(old)
    return new


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has something to read (or its end) within `timeout` seconds. poll, not
    select: select refuses a descriptor number of 1024 or more (ValueError), which a process
    with many files open gives a session socket."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000) + 1)))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _reason_of(exc: BaseException) -> str:
    """The reason a refusal carries: the exception's message (its type if it has none)."""
    data = (str(exc) or type(exc).__name__).encode()
    if len(data) <= MAX_REASON_BYTES:
        return data.decode()
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


class Session:
    """A live session with membrokerd. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        name: str,
        runtime_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        calls: str = "session",
        resume: float = DEFAULT_RESUME,
    ) -> None:
        if calls not in ("session", "grpc"):
            raise ValueError(f"calls must be 'session' or 'grpc', not {calls!r}")
        rdir = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        self.name = name
        self.timeout = timeout
        # "session": control calls travel on the session socket (a Unix-socket round trip),
        # "grpc": on control.sock. Either way the broker runs the same method.
        self.calls = calls
        # Seconds to keep trying to resume after the connection is lost (0: never resume).
        self.resume = resume
        # Connections lost and resumed so far; the resume token of the current connection.
        self.resumes = 0
        self.resume_token = ""
        # While the session reconnects: calls fail at once with BrokerRestarting. Every lost
        # connection starts a new generation: a waiter of the old one knows its answer is lost.
        self._resuming = False
        self._generation = 0
        # Why the broker said goodbye (not fenced) before the connection went: resumable.
        self._gone_reason: str | None = None
        self._call_ids = itertools.count(1)
        # id -> the CallResult, once it came (None while awaited), under _cv
        self._results: dict[int, spb.CallResult | None] = {}
        self.control_socket = rdir / "control.sock"
        self.session_socket = rdir / "session.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._fds: dict[int, int] = {}
        self._handlers: dict[str, PushHandler] = {}
        self._buffered: dict[str, _Pending] = {}
        # Revoke parts waiting for their last part, by (space, seq): the reader's alone.
        self._partial: dict[tuple[str, str, int], _Push] = {}
        # Ranges a handler gave up (report_withdrawn), per space, until the next RevokeAck.
        self._withdrawn: dict[str, list[tuple[int, int]]] = {}
        # Buffers lost in flight (report_in_flight), per space, until the next RevokeAck.
        self._in_flight: dict[str, list[tuple[int, int]]] = {}
        # Ranges in _partial and _buffered (under _cv), bounded by MAX_PENDING_RANGES.
        self._held_ranges = 0
        self._pongs: dict[int, float] = {}
        self._sealed_results: dict[str, str] = {}
        self._nonce = itertools.count(1)
        self._offer_tag = itertools.count(1)
        self._closed_reason: str | None = None
        self._last_error_code = 0  # of an Error frame the broker left on its way out
        self._fenced = False
        self._reader: threading.Thread | None = None
        self._decoder = wire.FrameDecoder()
        # The call channel (`_call_on_channel`): a socketpair end whose other end the broker
        # holds, the connection generation it was made on, its decoder; one caller at a time.
        self._call_chan: socket.socket | None = None
        self._channel_generation = -1
        self._channel_decoder = wire.FrameDecoder()
        self._channel_lock = threading.Lock()
        self._call_channels = False  # the broker takes them (Welcome.call_channels)
        # Calls answered on the calling thread's own channel so far.
        self.calls_on_channel = 0
        self._recv_cap = SMALL_RECV_BYTES
        try:
            self._sock.settimeout(timeout)
            self._connect(timeout)
            self._send(
                spb.Frame(hello=spb.Hello(protocol_version=wire.PROTOCOL_VERSION, client_name=name))
            )
            welcome = self._read_welcome()
            self._sock.settimeout(None)
        except BaseException as exc:
            self._sock.close()
            self._decoder.close()
            if isinstance(exc, SessionClosed):
                if self._last_error_code == 14:  # UNAVAILABLE: try again
                    raise BrokerBusy(f"broker is busy: {exc.reason}") from exc
                raise ConnectError(f"broker refused the session: {exc.reason}") from exc
            raise
        self._adopt_welcome(welcome)
        # The gRPC channel and its stub: made at the first call over gRPC (`_grpc_stub`).
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._grpc_lock = threading.Lock()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"membroker-{name}", daemon=True
        )
        self._reader.start()

    def _adopt_welcome(self, welcome: spb.Welcome) -> None:
        """Takes the identity and limits a Welcome gives (at the start, and at each resume)."""
        self.session_id = welcome.session_id
        self.token = welcome.token
        self.broker_pid = welcome.broker_pid
        self.page_size = welcome.page_size
        self.resume_token = welcome.resume_token
        max_frame = welcome.max_frame_bytes or wire.DEFAULT_MAX_FRAME
        if max_frame > MAX_FRAME_CEILING:
            log.warning(
                "broker announces frames of up to %d bytes; accepting at most %d",
                max_frame,
                MAX_FRAME_CEILING,
            )
            max_frame = MAX_FRAME_CEILING
        # The limit the broker splits its pushes under (Welcome.max_frame_bytes).
        self.max_frame_bytes = max_frame
        self._decoder.max_frame = max_frame
        self._recv_cap = min(max_frame + wire.HEADER.size, MAX_RECV_BYTES)
        self._call_channels = welcome.call_channels
        self._metadata = ((TOKEN_KEY, self.token),)

    def _connect(self, timeout: float) -> None:
        """connect() to session.sock. Kernel gotcha: a Unix socket with a timeout is
        non-blocking underneath, and a full listen backlog (a busy or flooded broker) answers
        EAGAIN at once instead of waiting: retried, with a short backoff, until `timeout`."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                self._sock.connect(str(self.session_socket))
                return
            except BlockingIOError as exc:
                if time.monotonic() + pause >= deadline:
                    raise ConnectError(
                        f"cannot connect to {self.session_socket}: its backlog stayed full for "
                        f"{timeout:g} s ({exc})"
                    ) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            except OSError as exc:
                raise ConnectError(
                    f"cannot connect to {self.session_socket}: {exc} "
                    "(is membrokerd running with this runtime directory?)"
                ) from exc

    def __repr__(self) -> str:
        state = f"closed: {self._closed_reason}" if self._closed_reason else "open"
        return f"<Session {self.name!r} {getattr(self, 'session_id', '?')} {state}>"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def closed_reason(self) -> str | None:
        """Why the session ended (None while it is open)."""
        return self._closed_reason

    @property
    def fenced(self) -> bool:
        return self._fenced

    def _closed_error(self) -> SessionClosed:
        """The exception for a call on an ended session (call with the reason set)."""
        return SessionClosed(self._closed_reason or "session closed", fenced=self._fenced)

    # -- frames --------------------------------------------------------------------------------

    def _send(self, frame: spb.Frame, fds: Sequence[int] = ()) -> None:
        """Sends one frame; SessionClosed (with the broker's last word, if any) when it cannot."""
        data = memoryview(wire.encode(frame))
        with self._cv:
            if self._closed_reason is not None:
                raise self._closed_error()
            if self._resuming:
                raise self._restarting_error()
        failure: OSError | None = None
        with self._send_lock:
            try:
                while data:
                    sent = sys_sock.send_with_fds(self._sock, data, fds)
                    data, fds = data[sent:], ()
            except OSError as exc:
                failure = exc
        if failure is not None:
            raise self._broken(failure) from failure

    def _restarting_error(self) -> BrokerRestarting:
        return BrokerRestarting(
            "the broker is restarting or upgrading and this session is resuming: call again "
            "(a change the call started may or may not have been made)",
            code="UNAVAILABLE",
        )

    def _can_resume(self) -> bool:
        """Whether a lost connection is resumed: a resume token, resuming not turned off, and
        the session not ended (closed here, fenced, or refused with an Error)."""
        return bool(self.resume > 0 and self.resume_token and self._closed_reason is None)

    def _broken(self, failure: OSError) -> MembrokerError:
        """What a failed send means: the broker's own reason when it left one.

        EPIPE / ECONNRESET mean the broker closed the socket, usually right after a Goodbye
        (fencing, shutdown) or an Error frame that is still queued for us: give the reader up
        to LAST_WORDS_WAIT to record it, or read it here when no reader runs (handshake). On
        the reader thread itself, the read loop goes on reading for it.
        """
        reader = self._reader
        if reader is None:
            self._read_last_words()
        elif threading.current_thread() is not reader:
            with self._cv:
                self._cv.wait_for(
                    lambda: self._closed_reason is not None or self._resuming, LAST_WORDS_WAIT
                )
        with self._cv:
            if self._closed_reason is None and self._can_resume():
                return self._restarting_error()
            reason = self._closed_reason or f"session socket broken: {failure}"
            return SessionClosed(reason, fenced=self._fenced)

    def _read_last_words(self) -> None:
        """Reads what the broker left in the socket, up to LAST_WORDS_WAIT, for its reason.

        Only when no reader thread runs. Every other frame is dropped (its fds closed).
        """
        deadline = time.monotonic() + LAST_WORDS_WAIT
        while self._closed_reason is None and (left := deadline - time.monotonic()) > 0:
            try:
                if not _readable(self._sock, left):
                    return
                data, fds, _ = sys_sock.recv_with_fds(self._sock, self._recv_size())
                if not data:
                    _close_all(fds)
                    return
                frames = self._decoder.feed(data, fds)
            except (OSError, ValueError, ProtocolError):
                return
            for frame, frame_fds in frames:
                _close_all(frame_fds)
                self._note_last_word(frame)

    def _note_last_word(self, frame: spb.Frame) -> None:
        """Records why the broker ends the session (Error, Goodbye); other frames are ignored."""
        kind = frame.WhichOneof("body")
        if kind == "error":
            self._last_error_code = frame.error.code
            reason = f"broker error {frame.error.code}: {frame.error.message}"
            fenced = False
        elif kind == "goodbye":
            fenced = frame.goodbye.fenced
            reason = ("fenced: " if fenced else "") + frame.goodbye.reason
            if frame.goodbye.restarting and not fenced and self._reader and self._can_resume():
                # A restart or an upgrade (or a stop of a daemon whose state would outlive
                # it): the connection ends next, and the session tries to resume.
                self._gone_reason = reason
                return
        else:
            return
        with self._cv:
            if self._closed_reason is None:
                self._closed_reason = reason
                self._fenced = fenced
            self._cv.notify_all()

    def _recv_exact(self, n: int) -> bytes:
        """Exactly n handshake bytes (no fds may come with them)."""
        buf = bytearray()
        while len(buf) < n:
            data, fds, truncated = sys_sock.recv_with_fds(self._sock, n - len(buf))
            if fds or truncated:
                _close_all(fds)
                raise ConnectError("broker sent file descriptors during the handshake")
            if not data:
                raise ConnectError("broker closed the session during the handshake")
            buf += data
        return bytes(buf)

    def _read_welcome(self) -> spb.Welcome:
        """Reads exactly the broker's first frame; what follows waits for the reader thread,
        which decodes it under the limit the Welcome announces."""
        try:
            header = self._recv_exact(wire.HEADER.size)
            (length,) = wire.HEADER.unpack(header)
            if length > wire.DEFAULT_MAX_FRAME:
                raise ConnectError(f"handshake frame of {length} bytes: not a membroker broker?")
            ((frame, _),) = self._decoder.feed(header + self._recv_exact(length), [])
        except ProtocolError as exc:
            raise ConnectError(f"broker sent an invalid handshake frame: {exc}") from exc
        except OSError as exc:
            raise ConnectError(f"no Welcome from the broker: {exc}") from exc
        kind = frame.WhichOneof("body")
        if kind == "welcome":
            return frame.welcome
        if kind == "error":
            self._last_error_code = frame.error.code
            if frame.error.code == 14:  # UNAVAILABLE: try again
                raise BrokerBusy(f"broker is busy: {frame.error.message}")
            raise ConnectError(f"broker refused the session: {frame.error.message}")
        if kind == "goodbye":
            if frame.goodbye.restarting:
                # It restarts or upgrades right now: worth asking again in a moment.
                raise BrokerBusy(f"broker is restarting: {frame.goodbye.reason}")
            raise ConnectError(f"broker refused the session: {frame.goodbye.reason}")
        raise ConnectError(f"unexpected {kind} frame during the handshake")

    def _recv_size(self) -> int:
        """The next recvmsg's buffer: small, unless a large frame is known to be coming."""
        return min(max(self._decoder.missing_bytes, SMALL_RECV_BYTES), self._recv_cap)

    def _read_loop(self) -> None:
        """The reader thread: decodes and dispatches frames until the session ends.

        A connection that ends while the session may resume (the broker restarted or is
        upgrading: EOF, or its Goodbye without fencing) is resumed: see `_resume`. Whatever
        else ends it -- the broker's Error or fencing, a protocol error, a bug, a resume that
        fails -- closes the session with a reason, wakes every waiter and shuts the socket
        down (so the broker releases at once).
        """
        while True:
            reason = self._read_connection()
            if not self._can_resume():
                break
            failure = self._resume(self._gone_reason or reason)
            if failure is None:
                continue
            reason = failure
            break
        self._mark_closed(reason)

    def _read_connection(self) -> str:
        """Reads one connection to its end; returns why it ended."""
        reason: str | None = None
        broken_at: float | None = None
        try:
            while True:
                if broken_at is not None:
                    # A send of ours failed: the broker is gone, but its Goodbye or Error may
                    # still be queued here. Read on, briefly.
                    left = broken_at + LAST_WORDS_WAIT - time.monotonic()
                    if left <= 0 or not _readable(self._sock, left):
                        break
                data, fds, truncated = sys_sock.recv_with_fds(self._sock, self._recv_size())
                if truncated:
                    _close_all(fds)
                    raise ProtocolError("broker sent more fds than a frame carries")
                if not data:
                    break
                for frame, frame_fds in self._decoder.feed(data, fds):
                    try:
                        self._dispatch(frame, frame_fds)
                    except (SessionClosed, BrokerRestarting) as exc:
                        # Only our own sends raise these here (handlers' errors are caught):
                        # the socket is broken. Whether the broker ended the session (fenced,
                        # say, while a handler ran past the deadline) or restarts, its last
                        # word may be queued behind what we read so far: read on for it
                        # before a resume is tried.
                        reason = reason or (
                            exc.reason
                            if isinstance(exc, SessionClosed)
                            else f"session ended: {exc}"
                        )
                        if broken_at is None:
                            broken_at = time.monotonic()
        except (OSError, MembrokerError) as exc:
            reason = f"session ended: {exc}"
        except BaseException as exc:
            # A bug here, or a handler that raised past its guard (SystemExit, say): the
            # session cannot serve its pushes any more, so it ends, loudly (no resume).
            log.exception("membroker session reader of %s failed", self.name)
            reason = f"session reader failed: {type(exc).__name__}: {exc}"
            self.resume = 0
        finally:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return reason or "broker closed the session"

    # -- resuming --------------------------------------------------------------------------------

    def _resume(self, lost: str) -> str | None:
        """Reconnects after the connection ended, with backoff, for up to `resume` seconds,
        saying Hello with the resume token; None once resumed, else why the session ends.

        Meanwhile calls fail at once with BrokerRestarting, and waiters of the lost connection
        are woken with it. Once the broker welcomes the session back, each attachment re-binds
        itself on a thread of its own (`_rebind`) while this reader serves the pushes that
        re-synchronise it."""
        with self._cv:
            self._resuming = True
            self._generation += 1
            for push in self._partial.values():
                self._held_ranges -= len(push.ranges)
            self._partial.clear()
            self._withdrawn.clear()
            self._in_flight.clear()
            self._cv.notify_all()
        log.warning(
            "session %s of %r: connection lost (%s): resuming", self.session_id, self.name, lost
        )
        deadline = time.monotonic() + self.resume
        pause = RESUME_FIRST_PAUSE
        while True:
            if self._closed_reason is not None:
                return self._closed_reason  # closed by the application meanwhile
            failure = self._reconnect(max(0.1, min(2.0, deadline - time.monotonic())))
            if failure is None:
                break
            if failure.startswith("resume refused"):
                log.error("session of %r: %s", self.name, failure)
                return f"{lost}; {failure}"
            if time.monotonic() + pause >= deadline:
                return f"{lost}; could not resume within {self.resume:g} s ({failure})"
            time.sleep(pause)
            pause = min(pause * 2, RESUME_MAX_PAUSE)
        with self._cv:
            if self._closed_reason is not None:
                # Closed by the application while it was welcomed back: end this connection.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                return self._closed_reason
            self._resuming = False
            self._gone_reason = None
            self.resumes += 1
            handlers = list(self._handlers.items())
            self._cv.notify_all()
        log.info(
            "session of %r resumed as %s (broker pid %d); re-binding %d attachment(s)",
            self.name,
            self.session_id,
            self.broker_pid,
            len(handlers),
        )
        if handlers:
            threading.Thread(
                target=self._rebind,
                args=(handlers,),
                name=f"membroker-resume-{self.name}",
                daemon=True,
            ).start()
        return None

    def _reconnect(self, timeout: float) -> str | None:
        """One attempt: a new connection, Hello with the resume token, its Welcome. None when
        the session is back; else why not ("resume refused: ..." when the broker refuses the
        token itself: no use trying again)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.session_socket))
        except OSError as exc:
            sock.close()
            return f"cannot connect: {exc}"
        hello = wire.encode(
            spb.Frame(
                hello=spb.Hello(
                    protocol_version=wire.PROTOCOL_VERSION,
                    client_name=self.name,
                    resume_token=self.resume_token,
                )
            )
        )
        with self._cv:
            if self._closed_reason is not None:
                sock.close()  # closed by the application meanwhile
                return "resume refused: the session was closed"
            with self._send_lock:
                old, self._sock = self._sock, sock
                old_decoder, self._decoder = self._decoder, wire.FrameDecoder()
        old.close()
        old_decoder.close()
        self._last_error_code = 0
        try:
            sock.sendall(hello)
            welcome = self._read_welcome()
        except BrokerBusy as exc:
            sock.close()
            return str(exc)
        except (ConnectError, OSError) as exc:
            sock.close()
            if self._last_error_code and self._last_error_code not in _RETRY_CODES:
                return f"resume refused: {exc}"
            return str(exc)
        if not welcome.resumed:
            sock.close()
            return "resume refused: the broker opened a new session instead"
        sock.settimeout(None)
        self._adopt_welcome(welcome)
        self._close_grpc()  # the next call over gRPC connects to the new broker
        return None

    def _rebind(self, handlers: list[tuple[str, PushHandler]]) -> None:
        """Each attachment re-binds itself (`on_resumed`: AttachRequest.resume); one that
        cannot drops what it maps. A connection lost again meanwhile leaves the rest to the
        next resume."""
        for space_id, handler in handlers:
            resumed = getattr(handler, "on_resumed", None)
            if resumed is None:
                continue
            try:
                resumed()
            except BrokerRestarting:
                return
            except Exception:
                log.exception("re-binding %s after a resume failed", space_id)

    def _lost(self, generation: int) -> bool:
        """Whether the connection a waiter started on is gone (call with _cv held)."""
        return self._resuming or self._generation != generation

    def _mark_closed(self, reason: str) -> None:
        with self._cv:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cv.notify_all()
            handlers = list(self._handlers.values())
            self._partial.clear()
            self._buffered.clear()
            self._held_ranges = 0
        for handler in handlers:
            try:
                handler.on_session_closed(self._closed_reason or reason)
            except Exception:
                log.exception("session-closed handler failed")

    def _hold(self, count: int) -> None:
        """Accounts for `count` more ranges held by the reader (call with _cv held)."""
        if self._held_ranges + count > MAX_PENDING_RANGES:
            raise ProtocolError(
                f"broker pushed more than {MAX_PENDING_RANGES} ranges not yet complete "
                f"({len(self._partial)} push(es) still expecting parts)"
            )
        self._held_ranges += count

    def _dispatch(self, frame: spb.Frame, fds: list[int]) -> None:
        kind = frame.WhichOneof("body")
        if kind == "fd_delivery":
            if frame.fd_delivery.upgrade:
                with self._cv:
                    target = self._handlers.get(frame.fd_delivery.space_id)
                    pending = self._buffered.get(frame.fd_delivery.space_id)
                upgrade = getattr(target, "on_new_fd", None)
                if upgrade is not None:
                    upgrade(fds[0])
                elif pending is not None:
                    pending.new_fd = _replace_fd(pending.new_fd, fds[0])
                else:
                    os.close(fds[0])
                return
            with self._cv:
                self._fds[frame.fd_delivery.tag] = fds[0]
                self._cv.notify_all()
        elif kind == "revoke":
            push = self._collect_revoke(frame.revoke)
            if push is not None:
                self._route(push)
        elif kind == "access_update":
            upd = frame.access_update
            ranges = [access_of(r) for r in upd.ranges]
            if upd.snapshot:
                self._collect_snapshot(upd.space_id, upd.seq, ranges, upd.more)
            else:
                # Parts of an update are collected like a revocation's: the handler sees the
                # whole change once (one re-plan of the mapping), and its seq only when all
                # of it is applied.
                with self._cv:
                    self._hold(len(ranges))
                key = ("update", upd.space_id, upd.seq)
                push = self._partial.pop(key, None)
                if push is None:
                    push = _Push(upd.space_id, upd.seq, ranges, revoke=False)
                else:
                    push.ranges.extend(ranges)
                if upd.more:
                    self._partial[key] = push
                else:
                    self._route(push)
        elif kind == "release_pins":
            req = frame.release_pins
            with self._cv:
                target = self._handlers.get(req.space_id)
            if target is not None:
                try:
                    target.on_unpin_request([(r.offset, r.length) for r in req.ranges])
                except Exception:
                    log.exception("on_unpin_request of %s failed", req.space_id)
        elif kind == "ping":
            self._send(spb.Frame(pong=spb.Pong(nonce=frame.ping.nonce)))
        elif kind == "pong":
            with self._cv:
                self._pongs[frame.pong.nonce] = time.perf_counter()
                self._cv.notify_all()
        elif kind == "call_result":
            with self._cv:
                if frame.call_result.id in self._results:
                    self._results[frame.call_result.id] = frame.call_result
                    self._cv.notify_all()
                else:
                    log.debug("late result of call %d dropped", frame.call_result.id)
        elif kind == "sealed_result":
            with self._cv:
                self._sealed_results[frame.sealed_result.space_id] = frame.sealed_result.error
                self._cv.notify_all()
        elif kind in ("error", "goodbye"):
            self._note_last_word(frame)
        else:
            log.warning("ignoring unexpected %s frame from the broker", kind)

    def _collect_revoke(self, rev: spb.Revoke) -> _Push | None:
        """Adds one Revoke frame to its change; returns the change once its last part came."""
        key = ("revoke", rev.space_id, rev.seq)
        ranges = [access_of(r) for r in rev.ranges]
        with self._cv:
            self._hold(len(ranges))
        push = self._partial.pop(key, None)
        if push is None:
            # The deadline runs from the first part: keep the first part's.
            push = _Push(rev.space_id, rev.seq, ranges, True, rev.space_deleted, rev.deadline_ms)
        else:
            push.ranges.extend(ranges)
            push.space_deleted = push.space_deleted or rev.space_deleted
        if rev.more:
            self._partial[key] = push
            return None
        return push

    def _collect_snapshot(
        self, space_id: str, seq: int, ranges: list[AccessRange], more: bool
    ) -> None:
        """Adds one part of an attach snapshot to the space being attached."""
        with self._cv:
            pending = self._buffered.get(space_id)
            if pending is None:
                # Only an attach in flight asks for one; a stale one changes nothing known.
                log.warning("ignoring an access snapshot of %s: it is not being attached", space_id)
                return
            self._hold(len(ranges))
            if pending.snapshot_seq != seq or pending.snapshot_done:
                # A new snapshot replaces an older one.
                self._held_ranges -= len(pending.snapshot)
                pending.snapshot = []
                pending.snapshot_seq = seq
                pending.snapshot_done = False
            pending.snapshot.extend(ranges)
            if not more:
                pending.snapshot_done = True
                self._cv.notify_all()

    def _route(self, push: _Push) -> None:
        """Hands a complete push to its space's handler, or holds it while the space attaches."""
        with self._cv:
            handler = self._handlers.get(push.space_id)
            if handler is None and push.space_id in self._buffered:
                self._buffered[push.space_id].pushes.append(push)
                return
            self._held_ranges -= len(push.ranges)
        self._deliver(handler, push)

    def _deliver(self, handler: PushHandler | None, push: _Push) -> None:
        """Runs a handler on one push; answers a revocation with RevokeAck or RevokeRefused.

        A revocation of a space without a handler (detached, or at or below the attach seq)
        is acknowledged: nothing of it is mapped here.
        """
        if not push.revoke:
            if handler is not None:
                try:
                    handler.on_access_update(push.seq, push.ranges)
                except Exception:
                    log.exception(
                        "applying access update seq %d of %s failed", push.seq, push.space_id
                    )
            return
        refusal: str | None = None
        if handler is not None:
            try:
                handler.on_revoke(push.seq, push.ranges, push.space_deleted, push.deadline_ms)
            except Exception as exc:
                refusal = _reason_of(exc)
                log.error(
                    "refusing revocation seq %d of %s (%d range(s)): %s",
                    push.seq,
                    push.space_id,
                    len(push.ranges),
                    refusal,
                    exc_info=exc,
                )
        with self._cv:
            withdrawn = self._withdrawn.pop(push.space_id, [])
            lost = self._in_flight.pop(push.space_id, [])
        in_flight = _within(lost, push.ranges)
        if len(in_flight) > MAX_IN_FLIGHT_RANGES:
            log.warning(
                "%d in-flight ranges of %s: the acknowledgement of seq %d carries the first %d",
                len(in_flight),
                push.space_id,
                push.seq,
                MAX_IN_FLIGHT_RANGES,
            )
        if len(withdrawn) > MAX_WITHDRAWN_RANGES:
            log.warning(
                "%d withdrawn ranges of %s: the acknowledgement of seq %d carries the first %d",
                len(withdrawn),
                push.space_id,
                push.seq,
                MAX_WITHDRAWN_RANGES,
            )
        if refusal is None:
            # Acknowledge only after the handler returned: by then the ranges are torn down.
            self._send(
                spb.Frame(
                    revoke_ack=spb.RevokeAck(
                        space_id=push.space_id,
                        seq=push.seq,
                        withdrawn=[
                            spb.Range(offset=o, length=n)
                            for o, n in withdrawn[:MAX_WITHDRAWN_RANGES]
                        ],
                        in_flight=[
                            spb.Range(offset=o, length=n)
                            for o, n in in_flight[:MAX_IN_FLIGHT_RANGES]
                        ],
                    )
                )
            )
        else:
            self._send(
                spb.Frame(
                    revoke_refused=spb.RevokeRefused(
                        space_id=push.space_id, seq=push.seq, reason=refusal
                    )
                )
            )

    # -- attachments (used by membroker.clients) -----------------------------------------------

    def _expect(self, space_id: str) -> None:
        """Buffers the pushes of a space until its handler is installed."""
        with self._cv:
            self._buffered.setdefault(space_id, _Pending())

    def _take_snapshot(
        self, space_id: str, seq: int, timeout: float | None = None
    ) -> list[AccessRange]:
        """Waits for the access snapshot at `seq` the broker sent before its Attach reply
        (AttachResponse.ranges_on_session) and takes it: the client's effective access."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._cv:
            generation = self._generation
            while True:
                pending = self._buffered.get(space_id)
                if self._closed_reason is not None:
                    raise self._closed_error()
                if self._lost(generation):
                    raise self._restarting_error()
                if pending is None:
                    raise ProtocolError(f"{space_id} is not being attached")
                if pending.snapshot_done and pending.snapshot_seq == seq:
                    ranges = pending.snapshot
                    self._held_ranges -= len(ranges)
                    pending.snapshot = []
                    pending.snapshot_seq = -1
                    pending.snapshot_done = False
                    return ranges
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(
                        f"the access snapshot of {space_id} at seq {seq} did not arrive"
                    )
                self._cv.wait(left)

    def _install(self, space_id: str, handler: PushHandler, after_seq: int) -> None:
        """Installs a handler and replays the pushes newer than the attach snapshot."""
        while True:
            with self._cv:
                if self._closed_reason is not None:
                    raise self._closed_error()
                pending = self._buffered.get(space_id)
                pushes = pending.pushes if pending is not None else []
                if pending is None or not pushes:
                    new_fd = -1
                    if pending is not None:
                        self._held_ranges -= pending.held_ranges
                        new_fd, pending.new_fd = pending.new_fd, -1
                    self._buffered.pop(space_id, None)
                    self._handlers[space_id] = handler
                    upgrade = getattr(handler, "on_new_fd", None)
                    if new_fd >= 0:
                        if upgrade is not None:
                            upgrade(new_fd)
                        else:
                            os.close(new_fd)
                    return
                self._held_ranges -= sum(len(p.ranges) for p in pushes)
                pending.pushes = []
            for push in pushes:
                # At or below the snapshot's seq a push is already in it (a revoke: acked).
                self._deliver(handler if push.seq > after_seq else None, push)

    def report_withdrawn(self, space_id: str, spans: Sequence[tuple[int, int]]) -> None:
        """Ranges `[start, end)` of a space this client still holds but has given up (it
        could not keep using them safely): they go with the next acknowledgement of a
        revocation of the space, and the owner's report lists them as withdrawn. Meant for a
        push handler (`on_revoke`, `on_unpin_request`), whose revocation is acknowledged
        next. Adjacent and overlapping ranges are merged."""
        with self._cv:
            self._withdrawn[space_id] = _merged(self._withdrawn.get(space_id, []), spans)

    def report_in_flight(self, space_id: str, spans: Sequence[tuple[int, int]]) -> None:
        """Byte ranges `[start, end)` of a space holding buffers this client's device had been
        offered (on a ring) that lie in memory being revoked, and that the device will never
        touch now: they go with the next acknowledgement of a revocation of the space (only
        the parts inside what that revocation takes; the rest is dropped, as it is not about
        that revocation), and the owner's report lists them as in flight. Meant for a push
        handler, like `report_withdrawn`. Adjacent and overlapping ranges are merged."""
        with self._cv:
            self._in_flight[space_id] = _merged(self._in_flight.get(space_id, []), spans)

    def declare_isolation(self, space_id: str, logical_only: str) -> None:
        """Tells the broker how far this client's isolation of an attached space goes:
        `logical_only` empty when nothing it knows of reaches beyond what it holds, otherwise
        why only good behaviour keeps a process it serves to its grants (say, a vhost-user
        backend that keeps fds of the whole space). The broker shows the last statement in
        ListSessions and in revocation reports; cut to 256 bytes."""
        note = logical_only.encode()[:MAX_ISOLATION_NOTE_BYTES].decode(errors="ignore")
        self._send(spb.Frame(isolation=spb.Isolation(space_id=space_id, logical_only=note)))

    def _uninstall(self, space_id: str) -> None:
        with self._cv:
            self._handlers.pop(space_id, None)
            self._withdrawn.pop(space_id, None)
            self._in_flight.pop(space_id, None)
            pending = self._buffered.pop(space_id, None)
            if pending is not None:
                self._held_ranges -= pending.held_ranges
                pending.new_fd = _replace_fd(pending.new_fd, -1)

    def _wait_sealed(self, space_id: str, timeout: float | None = None) -> str:
        """Waits for the broker's answer to a sealed mapping: '' when accepted, else why not."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._cv:
            generation = self._generation
            while space_id not in self._sealed_results:
                if self._closed_reason is not None:
                    raise self._closed_error()
                if self._lost(generation):
                    raise self._restarting_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(
                        f"the broker did not answer the sealed mapping of {space_id}"
                    )
                self._cv.wait(left)
            return self._sealed_results.pop(space_id)

    def take_fd(self, tag: int, timeout: float | None = None) -> int:
        """Waits for the fd the broker delivers under `tag`; the caller owns it."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._cv:
            generation = self._generation
            while tag not in self._fds:
                if self._closed_reason is not None:
                    raise SessionClosed(self._closed_reason, fenced=self._fenced)
                if self._lost(generation):
                    raise self._restarting_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(f"fd with tag {tag} did not arrive")
                self._cv.wait(left)
            return self._fds.pop(tag)

    def offer_fd(self, fd: int) -> int:
        """Sends a copy of `fd` (borrowed) to the broker; returns the tag to name it by."""
        tag = next(self._offer_tag)
        self._send(spb.Frame(fd_offer=spb.FdOffer(tag=tag)), [fd])
        return tag

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One control call; broker errors become typed exceptions.

        As Call frames (calls="session", the default) when the request fits a frame and the
        caller is not the session's own reader thread (a push handler calling back): on the
        call channel, answered to this thread, or on the session socket while another thread
        uses the channel (the reader thread hands the answer over). Else over gRPC with the
        session token."""
        if self._closed_reason is not None:
            raise SessionClosed(self._closed_reason, fenced=self._fenced)
        if self._resuming:
            raise self._restarting_error()
        if self.calls == "session" and threading.current_thread() is not self._reader:
            body = request.SerializeToString()
            if len(body) <= self.max_frame_bytes - CALL_OVERHEAD:
                try:
                    # On the call channel, read by this thread; while another thread uses it,
                    # on the session socket, handed over by the reader thread.
                    if self._call_channels and self._channel_lock.acquire(blocking=False):
                        try:
                            return self._call_on_channel(method, request, body, timeout)
                        finally:
                            self._channel_lock.release()
                    return self._call_on_session(method, request, body, timeout)
                except ResourceExhausted as exc:
                    if "does not fit a session frame" not in exc.details:
                        raise
                    # The answer is too large for a frame: ask again over gRPC.
        import grpc

        try:
            return getattr(self._grpc_stub(), method)(
                request,
                metadata=self._metadata,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, method, request)
            if isinstance(error, (Unavailable, Unauthenticated)) and (
                self._resuming or (isinstance(error, Unavailable) and self._can_resume())
            ):
                # The broker is gone for now (a restart, an upgrade): the session resumes.
                raise self._restarting_error() from exc
            if isinstance(error, Unauthenticated):
                # The broker ended this session (fenced it, say): its Goodbye says why, and
                # may be a moment behind the call's failure.
                with self._cv:
                    self._cv.wait_for(lambda: self._closed_reason is not None, LAST_WORDS_WAIT)
                    if self._closed_reason is not None:
                        raise self._closed_error() from exc
            raise error from exc

    def _call_on_session(
        self, method: str, request: Any, body: bytes, timeout: float | None
    ) -> Any:
        response_class = _RESPONSES.get(method)
        if response_class is None:
            raise Unimplemented(f"no method {method!r}", method=method, request=request)
        call_id = next(self._call_ids)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._cv:
            self._results[call_id] = None
            generation = self._generation
        try:
            self._send(spb.Frame(call=spb.Call(id=call_id, method=method, body=body)))
            with self._cv:
                while (result := self._results[call_id]) is None:
                    if self._closed_reason is not None:
                        raise self._closed_error()
                    if self._lost(generation):
                        # Its connection is gone: the answer will never come.
                        raise self._restarting_error()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        with contextlib.suppress(OSError, MembrokerError):
                            self._send(spb.Frame(call_cancelled=spb.CallCancelled(id=call_id)))
                        raise _deadline_exceeded(method, request)
                    self._cv.wait(left)
        finally:
            with self._cv:
                self._results.pop(call_id, None)
        return _answer(result, response_class, method, request)

    def _grpc_stub(self) -> Any:
        """The stub for calls over gRPC, made with its channel at the first such call: the SDK
        imports grpc only then (membroker.errors says why). The channel connects lazily."""
        with self._grpc_lock:
            if self._stub is None:
                import grpc

                from membroker.v1 import broker_pb2_grpc as pb_grpc

                self._channel = grpc.insecure_channel(f"unix:{self.control_socket}")
                self._stub = pb_grpc.MemBrokerStub(self._channel)  # type: ignore[no-untyped-call]
            return self._stub

    def _close_grpc(self) -> None:
        with self._grpc_lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _call_on_channel(
        self, method: str, request: Any, body: bytes, timeout: float | None
    ) -> Any:
        """`_call_on_session`, but sent on the call channel and its answer read here, by the
        calling thread: no hand-off through the reader thread (bench/handoff_bench.py). Call
        with `_channel_lock` held. The channel is made at the first call on each connection
        of the session (a CallChannel frame carrying one end of a socketpair)."""
        response_class = _RESPONSES.get(method)
        if response_class is None:
            raise Unimplemented(f"no method {method!r}", method=method, request=request)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        chan, generation = self._open_channel()
        call_id = next(self._call_ids)
        with self._cv:
            self._results[call_id] = None  # in flight, as on the session socket
        try:
            chan.settimeout(max(deadline - time.monotonic(), 0.001))
            chan.sendall(
                wire.encode(spb.Frame(call=spb.Call(id=call_id, method=method, body=body)))
            )
            result = self._channel_result(chan, call_id, deadline)
        except TimeoutError:
            try:
                chan.settimeout(0.1)
                chan.sendall(wire.encode(spb.Frame(call_cancelled=spb.CallCancelled(id=call_id))))
            except OSError:
                self._drop_channel()  # half a frame may be in it: never used again
            raise _deadline_exceeded(method, request) from None
        except (OSError, ProtocolError) as exc:
            self._drop_channel()
            raise self._channel_lost(generation, method, request, str(exc)) from exc
        finally:
            with self._cv:
                self._results.pop(call_id, None)
        self.calls_on_channel += 1
        return _answer(result, response_class, method, request)

    def _open_channel(self) -> tuple[socket.socket, int]:
        """The call channel of the current connection, made now if it has none yet."""
        with self._cv:
            generation = self._generation
        if self._call_chan is not None and self._channel_generation == generation:
            return self._call_chan, generation
        self._drop_channel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Every byte must carry its sender's credentials, including those sent before the
            # broker sets SO_PASSCRED on its end: it refuses bytes of another process (or none).
            sys_sock.pass_credentials(ours)
            self._send(spb.Frame(call_channel=spb.CallChannel()), [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._call_chan, self._channel_generation = ours, generation
        self._channel_decoder = wire.FrameDecoder(self.max_frame_bytes)
        return ours, generation

    def _channel_result(self, chan: socket.socket, call_id: int, deadline: float) -> spb.CallResult:
        """Reads the channel until call `call_id`'s answer (answers of calls given up before
        are dropped). TimeoutError past `deadline`; OSError when the channel ends."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            chan.settimeout(left)
            missing = self._channel_decoder.missing_bytes
            data = chan.recv(min(max(missing, SMALL_RECV_BYTES), self._recv_cap))
            if not data:
                raise ConnectionResetError("the broker closed the call channel")
            for frame, _ in self._channel_decoder.feed(data, []):
                kind = frame.WhichOneof("body")
                if kind == "call_result" and frame.call_result.id == call_id:
                    return frame.call_result
                if kind == "error":
                    raise ConnectionResetError(
                        f"the broker closed the call channel: {frame.error.message}"
                    )
                log.debug("dropped a %s frame on the call channel", kind)

    def _channel_lost(self, generation: int, method: str, request: Any, why: str) -> MembrokerError:
        """What a call whose channel ended says: the session's end or its resume if that is
        why (the reader learns of it within moments), else that the answer is lost."""
        with self._cv:
            self._cv.wait_for(
                lambda: self._closed_reason is not None or self._lost(generation),
                LAST_WORDS_WAIT,
            )
            if self._closed_reason is not None:
                return self._closed_error()
            if self._lost(generation):
                return self._restarting_error()
        return BrokerError(
            f"the call channel ended while the call was in flight ({why}): a change it "
            "started may or may not have been made",
            method=method,
            request=request,
            code="UNAVAILABLE",
        )

    def _drop_channel(self) -> None:
        chan, self._call_chan = self._call_chan, None
        if chan is not None:
            chan.close()
        self._channel_decoder.close()

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip on the session socket, in seconds."""
        nonce = next(self._nonce)
        t0 = time.perf_counter()
        self._send(spb.Frame(ping=spb.Ping(nonce=nonce)))
        with self._cv:
            while nonce not in self._pongs:
                if self._closed_reason is not None:
                    raise SessionClosed(self._closed_reason, fenced=self._fenced)
                if not self._cv.wait(timeout):
                    raise ProtocolError("no pong")
            return self._pongs.pop(nonce) - t0

    # -- owner API -----------------------------------------------------------------------------

    def create_space(
        self,
        size: int,
        *,
        backing: str = "memfd",
        name: str = "",
        ephemeral: bool = False,
        regions: Sequence[Region] = (),
        huge_page_size: int = 0,
    ) -> OwnedSpace:
        """Allocates a space owned by this session's client name; returns it with its fd."""
        from membroker.types import backing_pb

        req = pb.CreateSpaceRequest(
            size=size,
            backing=backing_pb(backing),
            name=name,
            ephemeral=ephemeral,
            huge_page_size=huge_page_size,
            regions=[r.to_pb() for r in regions],
        )
        resp = self.call("CreateSpace", req)
        return OwnedSpace(self, SpaceInfo.from_pb(resp.space), self.take_fd(resp.fd_tag))

    def import_space(
        self,
        fd: int,
        *,
        name: str = "",
        ephemeral: bool = False,
        regions: Sequence[Region] = (),
        expected_size: int = 0,
    ) -> OwnedSpace:
        """Hands the broker a copy of an fd this process owns (a memfd or guest_memfd).

        An unsealed memfd is sealed against shrink and grow. The caller keeps its own fd.
        """
        tag = self.offer_fd(fd)
        resp = self.call(
            "ImportSpace",
            pb.ImportSpaceRequest(
                fd_tag=tag,
                name=name,
                ephemeral=ephemeral,
                regions=[r.to_pb() for r in regions],
                expected_size=expected_size,
            ),
        )
        return OwnedSpace(self, SpaceInfo.from_pb(resp.space), None)

    def space(self, space_id: str) -> OwnedSpace:
        """A handle on an existing space (no fd), e.g. one this client name owned before."""
        return OwnedSpace(self, self.get_space(space_id), None)

    def get_space(self, space_id: str) -> SpaceInfo:
        return SpaceInfo.from_pb(self.call("GetSpace", pb.GetSpaceRequest(space_id=space_id)))

    def list_spaces(self) -> list[SpaceInfo]:
        return [
            SpaceInfo.from_pb(s) for s in self.call("ListSpaces", pb.ListSpacesRequest()).spaces
        ]

    def list_grants(self, space_id: str, client: str = "") -> list[tuple[str, AccessRange]]:
        """Every grant record of the space (or of one client), sorted by client then offset,
        fetched a page at a time."""
        out: list[tuple[str, AccessRange]] = []
        start_client, start_offset = "", 0
        while True:
            resp = self.call(
                "ListGrants",
                pb.ListGrantsRequest(
                    space_id=space_id,
                    client=client,
                    start_client=start_client,
                    start_offset=start_offset,
                ),
            )
            out += [(g.client, access_of(g.range)) for g in resp.grants]
            if not resp.more:
                return out
            start_client, start_offset = resp.next_client, resp.next_offset

    def list_sessions(self) -> list[pb.SessionInfo]:
        return list(self.call("ListSessions", pb.ListSessionsRequest()).sessions)

    def list_pins(self, space_id: str) -> list[pb.PinRecord]:
        return list(self.call("ListPins", pb.ListPinsRequest(space_id=space_id)).pins)

    def list_revocations(self, space_id: str, after_seq: int = 0) -> list[RevocationReport]:
        """The reports of a space's latest revocations with a seq above `after_seq`.

        Kept by the broker even when the call that started one was cancelled or timed out
        (`caller_gone`): a revocation that began always runs to its end."""
        resp = self.call(
            "ListRevocations",
            pb.ListRevocationsRequest(space_id=space_id, after_seq=after_seq),
        )
        return [RevocationReport.from_pb(r) for r in resp.reports]

    def stats(self) -> pb.Stats:
        stats: pb.Stats = self.call("GetStats", pb.GetStatsRequest())
        return stats

    # -- client API ----------------------------------------------------------------------------

    def attach_va(
        self,
        space_id: str,
        on_revoke: Callable[[list[AccessRange]], None] | None = None,
        *,
        mode: str = "auto",
    ) -> VaClient:
        """Maps the whole space; only what this client name holds can be touched.

        mode 'sealed': the mapping is sealed and holds no fd, and the broker maps each held
        page in on first touch (a touch of anything else is a SIGBUS); 'cooperative': the
        mapping is PROT_NONE and this SDK opens what is held (mprotect, guard markers);
        'auto' (default): sealed where the kernel offers it."""
        from membroker.clients import VaClient

        return VaClient(self, space_id, on_revoke, mode)

    def attach_fd(
        self,
        space_id: str,
        on_revoke: Callable[[list[AccessRange]], None] | None = None,
        on_unpin_request: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> FdClient:
        """Receives the space's fd; use `pin()` around every use of a range.

        on_unpin_request(ranges): a revocation is waiting for this client's pins in these
        (offset, length) ranges; stop using them and unpin, or the revocation fails or fences
        this client at its deadline."""
        from membroker.clients import FdClient

        client = FdClient(self, space_id, on_revoke)
        client.on_unpin_requested = on_unpin_request
        return client

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Ends the session: every attachment lets go of its space first (a VaClient's mapping
        is unmapped, or zapped if sealed; an FdClient's fd is closed), then the broker
        releases everything it held for it. The broker looks at the process once the session
        has ended, and fences one that still reaches a space it was attached to."""
        with self._cv:
            if self._closed_reason is None:
                self._closed_reason = "closed by the client"
            self._cv.notify_all()
            handlers = list(self._handlers.values())
        for handler in handlers:
            try:
                handler.on_session_closed(self._closed_reason or "closed by the client")
            except Exception:
                log.exception("letting go of an attachment at the session's close failed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        reader = self._reader
        if reader is not None and reader.is_alive() and threading.current_thread() is not reader:
            reader.join(5)
        chan = self._call_chan
        if chan is not None:
            with contextlib.suppress(OSError):
                chan.shutdown(socket.SHUT_RDWR)  # a caller reading it gets its end now
        if self._channel_lock.acquire(timeout=5):
            try:
                self._drop_channel()
            finally:
                self._channel_lock.release()
        self._sock.close()
        self._close_grpc()
        with self._cv:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._decoder.close()


# Ranges per batch call (the broker takes up to 16,384): a batch is applied on the broker's
# event loop, and 8,192 ranges take it about 25 ms.
BATCH_RANGES = 8_192


def _chunks(ranges: Sequence[tuple[int, int]]) -> list[list[spb.Range]]:
    out = [
        [spb.Range(offset=o, length=n) for o, n in ranges[i : i + BATCH_RANGES]]
        for i in range(0, len(ranges), BATCH_RANGES)
    ]
    if not out:
        raise ValueError("a batch needs at least one range")
    return out


class OwnedSpace:
    """A space as its owner sees it: access decisions, and (when created here) its fd."""

    def __init__(self, session: Session, info: SpaceInfo, fd: int | None) -> None:
        self.session = session
        self.info = info
        self.space_id = info.space_id
        self.size = info.size
        # Owned by this object when the broker allocated the space; None for imports.
        self.fd = fd

    def __repr__(self) -> str:
        return f"<OwnedSpace {self.space_id} {self.info.backing} size={self.size}>"

    def share(self, offset: int, length: int) -> RevocationReport:
        return self._attributes(offset, length, pb.ATTRIBUTE_SHARED)

    def unshare(
        self, offset: int, length: int, *, on_pinned: str | None = None
    ) -> RevocationReport:
        """Converts to private: every client loses access before this returns.

        on_pinned: "fail" (FailedPrecondition naming the pinning client, nothing changes) or
        "fence" (the pinning clients are fenced) once a pin outlives the deadline; None takes
        the broker's default."""
        return self._attributes(offset, length, pb.ATTRIBUTE_PRIVATE, on_pinned)

    def _attributes(
        self, offset: int, length: int, attribute: pb.Attribute, on_pinned: str | None = None
    ) -> RevocationReport:
        resp = self.session.call(
            "SetAttributes",
            pb.SetAttributesRequest(
                space_id=self.space_id,
                range=spb.Range(offset=offset, length=length),
                attribute=attribute,
                on_pinned=on_pinned_pb(on_pinned),
            ),
        )
        return RevocationReport.from_pb(resp)

    def grant(
        self,
        client: str,
        offset: int,
        length: int,
        access: str = "rw",
        *,
        on_pinned: str | None = None,
    ) -> int:
        """Grants `client` ro or rw access; returns the new seq. (on_pinned applies when rw
        is lowered to ro over a range pinned for writing; see `unshare`.)"""
        from membroker.types import access_pb

        resp = self.session.call(
            "Grant",
            pb.GrantRequest(
                space_id=self.space_id,
                client=client,
                range=spb.Range(offset=offset, length=length),
                access=access_pb(access),
                on_pinned=on_pinned_pb(on_pinned),
            ),
        )
        return int(resp.seq)

    def revoke(
        self, client: str, offset: int, length: int, *, on_pinned: str | None = None
    ) -> RevocationReport:
        """Takes access back; returns once every affected client acknowledged or was fenced.

        A pinned range is waited for up to the deadline; then on_pinned decides (see
        `unshare`)."""
        resp = self.session.call(
            "Revoke",
            pb.RevokeRequest(
                space_id=self.space_id,
                client=client,
                range=spb.Range(offset=offset, length=length),
                on_pinned=on_pinned_pb(on_pinned),
            ),
        )
        return RevocationReport.from_pb(resp)

    # -- batches: many ranges, one change per call -----------------------------------------

    def grant_many(
        self,
        client: str,
        ranges: Sequence[tuple[int, int]],
        access: str = "rw",
        *,
        on_pinned: str | None = None,
    ) -> int:
        """`grant` over many sorted, disjoint (offset, length) ranges: one change (one seq)
        per BATCH_RANGES ranges. Returns the last seq."""
        from membroker.types import access_pb

        seq = 0
        for chunk in _chunks(ranges):
            resp = self.session.call(
                "Grant",
                pb.GrantRequest(
                    space_id=self.space_id,
                    client=client,
                    ranges=chunk,
                    access=access_pb(access),
                    on_pinned=on_pinned_pb(on_pinned),
                ),
            )
            seq = int(resp.seq)
        return seq

    def revoke_many(
        self, client: str, ranges: Sequence[tuple[int, int]], *, on_pinned: str | None = None
    ) -> list[RevocationReport]:
        """`revoke` over many sorted, disjoint ranges: one revocation per BATCH_RANGES."""
        return self._batches(
            "Revoke",
            ranges,
            lambda chunk: pb.RevokeRequest(
                space_id=self.space_id,
                client=client,
                ranges=chunk,
                on_pinned=on_pinned_pb(on_pinned),
            ),
        )

    def share_many(self, ranges: Sequence[tuple[int, int]]) -> list[RevocationReport]:
        return self._attributes_many(ranges, pb.ATTRIBUTE_SHARED, None)

    def unshare_many(
        self, ranges: Sequence[tuple[int, int]], *, on_pinned: str | None = None
    ) -> list[RevocationReport]:
        """`unshare` over many sorted, disjoint ranges: one revocation per BATCH_RANGES."""
        return self._attributes_many(ranges, pb.ATTRIBUTE_PRIVATE, on_pinned)

    def _attributes_many(
        self, ranges: Sequence[tuple[int, int]], attribute: pb.Attribute, on_pinned: str | None
    ) -> list[RevocationReport]:
        return self._batches(
            "SetAttributes",
            ranges,
            lambda chunk: pb.SetAttributesRequest(
                space_id=self.space_id,
                ranges=chunk,
                attribute=attribute,
                on_pinned=on_pinned_pb(on_pinned),
            ),
        )

    def _batches(
        self,
        method: str,
        ranges: Sequence[tuple[int, int]],
        request: Callable[[list[spb.Range]], Any],
    ) -> list[RevocationReport]:
        """One call of `method` per BATCH_RANGES ranges; their reports, in order."""
        return [
            RevocationReport.from_pb(self.session.call(method, request(chunk)))
            for chunk in _chunks(ranges)
        ]

    def grants(self, client: str = "") -> list[tuple[str, AccessRange]]:
        return self.session.list_grants(self.space_id, client)

    def revocations(self, after_seq: int = 0) -> list[RevocationReport]:
        """This space's latest revocation reports (see `Session.list_revocations`)."""
        return self.session.list_revocations(self.space_id, after_seq)

    def delete(self, *, on_pinned: str | None = None) -> RevocationReport:
        """Revokes everything from every client (pins: see `unshare`), then frees the space."""
        resp = self.session.call(
            "DeleteSpace",
            pb.DeleteSpaceRequest(space_id=self.space_id, on_pinned=on_pinned_pb(on_pinned)),
        )
        self.close()
        return RevocationReport.from_pb(resp)

    def map(self) -> Mapping:
        """Maps the whole space read-write for the owner (needs the fd)."""
        from membroker._sys.mman import PROT_READ, PROT_WRITE, Mapping

        if self.fd is None:
            raise MembrokerError("this handle has no fd: map the fd you imported yourself")
        return Mapping.map_shared(self.fd, self.size, PROT_READ | PROT_WRITE)

    def refresh(self) -> SpaceInfo:
        self.info = self.session.get_space(self.space_id)
        return self.info

    def close(self) -> None:
        """Closes this handle's fd (the space lives on in the broker)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


if TYPE_CHECKING:  # annotations only: these modules import this one (grpc: see _grpc_stub)
    import grpc

    from membroker._sys.mman import Mapping
    from membroker.clients import FdClient, VaClient

__all__ = ["OwnedSpace", "PushHandler", "Session", "backing_of", "default_runtime_dir"]


def _merged(
    known: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(offset, length) ranges `known` plus `[start, end)` spans, sorted, with adjacent and
    overlapping ones merged and empty ones dropped."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted([*known, *((s, e - s) for s, e in spans)]):
        if length <= 0:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            lo, n = out[-1]
            out[-1] = (lo, max(lo + n, offset + length) - lo)
        else:
            out.append((offset, length))
    return out


def _within(
    ranges: Sequence[tuple[int, int]], revoked: Sequence[AccessRange]
) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint (offset, length) `ranges` inside the `revoked` ranges
    (sorted), still sorted and disjoint (a range across two adjacent revoked ranges stays
    one)."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        end = offset + length
        # A revocation may push a million ranges: start at the last one beginning at or
        # before `offset`.
        at = max(0, bisect.bisect_right(revoked, offset, key=lambda r: r.offset) - 1)
        for i in range(at, len(revoked)):
            r = revoked[i]
            if r.offset >= end:
                break
            lo, hi = max(offset, r.offset), min(end, r.end)
            if lo >= hi:
                continue
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
    return out
