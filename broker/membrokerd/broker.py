"""The broker core: sessions, spaces and the revocation engine, on the event loop thread.

The servicer (gRPC edge) and the session listener call in here. Every change to a space runs as
a job of that space's queue (membrokerd.revocation.SpaceQueue), in order, to its end: the pure
access table answers "what changed, for whom"; the job pushes on the session sockets, waits for
acknowledgements, judges each one against the kernel's view of the client as it arrives, fences
whoever does not comply (membrokerd.enforcement), and reports.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import enum
import errno
import functools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from membroker import wire
from membroker._sys import kvm as sys_kvm
from membroker._sys import memfd as sys_memfd
from membroker._sys import sock as sys_sock
from membroker._sys import uffd as sys_uffd
from membroker._sys.proc import ProcessView, TooManyMappings, Vma
from membroker.errors import ProtocolError
from membroker.rangeset import RangeSet, touching
from membroker.v1 import session_pb2 as spb
from membrokerd import pidns, policy, systemd
from membrokerd.access import (
    Access,
    AccessRange,
    ClientDelta,
    Delta,
    InvalidRange,
    Pin,
    StaleChange,
    TooFragmented,
    TooManyPins,
    pin_span,
)
from membrokerd.config import BrokerConfig
from membrokerd.enforcement import (
    Enforcer,
    FenceResult,
    Reach,
    gone_soon,
    is_alive,
    still_reaches,
)
from membrokerd.errors import (
    BadRequest,
    LimitReached,
    NoSession,
    NotAllowed,
    RangePinned,
    UnknownObject,
    WrongState,
)
from membrokerd.faults import FaultServer, SealedMapping
from membrokerd.journal import (
    GRANT_RO,
    GRANT_RW,
    LARGE_CHANGE_BYTES,
    PRIVATE,
    REVOKE,
    SHARE,
    SHARED,
    JournalError,
    SessionRecord,
    SpaceRecord,
    Writer,
    change_bytes,
    restore_table,
)
from membrokerd.listener import Connection
from membrokerd.metrics import Metrics, Snapshot
from membrokerd.policy import Identity
from membrokerd.pushes import OFFLOAD_RANGES, Encoder, collector_paused, without_collector
from membrokerd.revocation import HISTORY, Ack, Batch, SpaceQueue, Verdict
from membrokerd.sessions import CLIENT_NAME, Session, process_start_time, token_hash
from membrokerd.spaces import (
    Attachment,
    BackingKind,
    Region,
    Space,
    check_regions,
    check_size,
    create_backing,
    inspect_import,
    seal_import,
)
from membrokerd.verify import Allowed, judge_view

if TYPE_CHECKING:
    from membrokerd.servicer import SessionCalls

log = logging.getLogger("membrokerd")

T = TypeVar("T")

# Attach replies carry at most this many ranges inline; more travel as snapshot frames.
ATTACH_INLINE_RANGES = 1024
# Control calls one session may have in flight on its socket.
MAX_CALLS_IN_FLIGHT = 64
# Up to this many revoked ranges, what a client may hold is looked up range by range.
FEW_RANGES = 64
# A small revocation is judged on the loop (no thread hop, no fight for the GIL with worker
# threads) by a PROCMAP_QUERY walk of the client's mappings, when its last look saw at most
# this many (~1 us each: a Python process has ~200) and no walk of it was ever slow. Any other,
# or a walk that meets more, is judged on a worker thread from the maps text.
INLINE_MAPPINGS = 1024
# Revocation reports are written to the journal together, at most this often.
REPORTS_FLUSH_S = 0.2
# How often a process whose session ended is looked at again during its fence grace.
CLOSE_POLL_S = 0.01


class Outcome(enum.Enum):
    ACKED = "acked"
    FENCED = "fenced"
    GONE = "gone"
    UNVERIFIED = "unverified"
    ENFORCED = "enforced"


@dataclasses.dataclass(frozen=True, slots=True)
class ClientResult:
    client: str
    session_id: str
    pid: int
    outcome: Outcome
    latency_s: float
    reason: str = ""
    fence: FenceResult | None = None
    # (offset, length) ranges the client gave up with its acknowledgement (still granted).
    withdrawn: tuple[tuple[int, int], ...] = ()
    # (offset, length) byte ranges of buffers in flight into the revoked memory that its
    # device will never touch now (RevokeAck.in_flight).
    in_flight: tuple[tuple[int, int], ...] = ()
    # Why the client's isolation of the space is logical only (its Isolation frame), or "".
    isolation: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Attached:
    """What an attach delivered: the fd's tag, the access at `seq` (inline unless
    `on_session`), and whether the fd is a read-write description."""

    space: Space
    tag: int
    seq: int
    ranges: Sequence[AccessRange]
    on_session: bool
    writable: bool
    sealed: bool = False


@dataclasses.dataclass(slots=True)
class RevocationResult:
    space_id: str
    seq: int
    clients: tuple[ClientResult, ...]
    duration_s: float
    revoked_bytes: int
    cause: str = ""
    # The call that started it went away (cancelled, deadline); it ran to its end anyway.
    caller_gone: bool = False


class Broker:
    """Everything the daemon knows, and every operation the control plane offers."""

    def __init__(self, config: BrokerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.started = time.monotonic()
        self.spaces: dict[str, Space] = {}
        self.queues: dict[str, SpaceQueue] = {}
        self.sessions: dict[Connection, Session | None] = {}
        self._by_token: dict[str, Session] = {}
        self._by_name: dict[str, Session] = {}
        self._by_id: dict[str, Session] = {}
        # client name -> the uid that first used it (client_name_binding = "uid")
        self._name_uid: dict[str, int] = {}
        # uid -> connections accepted and not yet past Hello
        self._waiting: dict[int, int] = {}
        self._gmem: sys_kvm.GuestMemfdFactory | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.revocations_total = 0
        self.fenced_total = 0
        self.unverified_total = 0
        # Set by the server: runs `Call` frames (membrokerd.servicer.SessionCalls).
        self.calls: SessionCalls | None = None
        # Set by the server: starts a live upgrade (the Upgrade call).
        self.request_upgrade: Callable[[], None] | None = None
        # Set by restore(): the journal's writer (None: no journal), and whether space fds go
        # to systemd's fd store.
        self.journal: Writer | None = None
        self.fd_store = False
        # New spaces whose journal row is being written (`_add_space`): not in self.spaces yet.
        self._creating: dict[str, Space] = {}
        self.faults = FaultServer(self._fault_refused)
        self.metrics = Metrics(self.snapshot)
        self.faults.observe = self.metrics.fault_seconds.observe
        self.metrics_url = ""
        self.enforcer = Enforcer(self)
        # Revocation reports not yet in the journal (space id, report, whether it updates one
        # written before), and the timer that writes them (`_journal_report`).
        self._unjournaled: list[tuple[str, RevocationResult, bool]] = []
        self._reports_flush: asyncio.TimerHandle | None = None
        # Sessions of the previous daemon that may resume (by token hash), until
        # resume_window_s after the start; and whether this daemon is stopping (its sessions
        # then stay resumable).
        self._resumable: dict[str, SessionRecord] = {}
        self.stopping = False
        # Seconds after a start during which the sessions of the previous daemon may resume
        # (their resume tokens are in the journal); then they are forgotten, and a process of
        # theirs that still maps a space is dealt with as a fenced one (`_unresumed`).
        self.resume_window_s = config.resume_window_s
        # A fence drops the client's grants in every space (Enforcer._begin): journaled here.
        begin = self.enforcer._begin

        def begin_then_journal(session: Session, kind: str, reason: str) -> Any:
            reach = begin(session, kind, reason)
            self._journal_forget(session.name)
            return reach

        self.enforcer._begin = begin_then_journal  # type: ignore[method-assign]

    def spawn(self, coro: Awaitable[object]) -> None:
        """Runs work that outlives its caller; failures are logged, never lost."""

        async def guarded() -> object:
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background work failed")
                return None

        task: asyncio.Task[object] = self.loop.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions ------------------------------------------------------------------------------

    def accept(self, sock: socket.socket) -> None:
        """An accepted session socket: refused at once (one cheap look at its uid) when over a
        limit, else identified (SO_PEERCRED, SO_PEERGROUPS, a pidfd) and kept."""
        refusal = None
        try:
            uid = sys_sock.peer_uid(sock)
        except OSError as exc:
            log.warning("cannot identify a session peer: %s", exc)
            sock.close()
            return
        waiting = self._waiting.get(uid, 0)
        code = 8  # RESOURCE_EXHAUSTED
        if len(self.sessions) >= self.config.max_sessions:
            refusal = f"too many sessions (limit max_sessions = {self.config.max_sessions})"
        elif waiting >= self.config.max_pending_hellos_per_uid:
            refusal = (
                f"too many connections of uid {uid} waiting to say Hello "
                f"(limit max_pending_hellos_per_uid = {self.config.max_pending_hellos_per_uid})"
            )
            # UNAVAILABLE: passes within moments (each says Hello or times out); the SDK
            # retries, so a burst of honest clients of one uid is slowed, not refused.
            code = 14
        if refusal is not None:
            # Refused before anything is built for it: a flood of connections costs the loop
            # one accept, one getsockopt, one send and one close each.
            try:
                sock.send(wire.encode(spb.Frame(error=spb.Error(code=code, message=refusal))))
            except OSError:
                pass
            sock.close()
            self.metrics.protocol_errors.inc()
            return
        try:
            # The identity the kernel saw at connect(), and the process itself (by pidfd).
            cred = sys_sock.peer_credentials(sock)
            pidfd = sys_sock.peer_pidfd(sock)
        except OSError as exc:
            log.warning("cannot identify a session peer: %s", exc)
            sock.close()
            return
        conn = Connection(
            self.loop,
            sock,
            self,
            self.config.max_frame_bytes,
            cred,
            pidfd,
            **_connection_limits(self.config),
        )
        self.sessions[conn] = None
        self._waiting[cred.uid] = waiting + 1
        self.loop.call_later(self.config.hello_timeout_s, self._hello_timeout, conn)

    def _stop_waiting(self, conn: Connection) -> None:
        """`conn` said Hello or closed before it: one fewer of its uid waiting."""
        uid = conn.cred.uid
        left = self._waiting.get(uid, 0) - 1
        if left > 0:
            self._waiting[uid] = left
        else:
            self._waiting.pop(uid, None)

    def _hello_timeout(self, conn: Connection) -> None:
        if not conn.closed and self.sessions.get(conn) is None:
            message = f"no Hello within {self.config.hello_timeout_s:g} s (hello_timeout_s)"
            self.on_protocol_error(conn, ProtocolError(message))
            conn.close("hello timeout", spb.Frame(error=spb.Error(code=4, message=message)))

    def authenticate(self, token: str | None) -> Session:
        session = self._by_token.get(token or "")
        if session is None:
            raise NoSession(
                "a live session token is required as metadata "
                "'membroker-session-token' (open a session on session.sock first)"
            )
        return session

    def on_protocol_error(self, conn: Connection, error: ProtocolError) -> None:
        self.metrics.protocol_errors.inc()
        log.warning("session of pid %d: %s", conn.cred.pid, error)

    def on_frame(self, conn: Connection, frame: spb.Frame, fds: list[int]) -> None:
        kind = frame.WhichOneof("body")
        session = self.sessions.get(conn)
        try:
            if session is None:
                if kind != "hello":
                    raise ProtocolError(f"the first frame must be hello, not {kind}")
                self._hello(conn, frame.hello)
            elif kind == "revoke_ack":
                ack = frame.revoke_ack
                self._ack(
                    session,
                    ack.space_id,
                    ack.seq,
                    None,
                    tuple((r.offset, r.length) for r in ack.withdrawn),
                    tuple((r.offset, r.length) for r in ack.in_flight),
                )
            elif kind == "revoke_refused":
                msg = frame.revoke_refused
                self._ack(session, msg.space_id, msg.seq, msg.reason[:512] or "no reason given")
            elif kind == "fd_offer":
                self._offer(session, frame.fd_offer.tag, fds)
                fds = []
            elif kind == "mapped":
                self._mapped(session, frame.mapped)
            elif kind == "isolation":
                self._isolation(session, frame.isolation)
            elif kind == "sealed":
                self._sealed(session, frame.sealed, fds)
                fds = []
            elif kind == "call":
                self._call(session, frame.call, conn)
            elif kind == "call_cancelled":
                _cancel_call(session, frame.call_cancelled.id)
            elif kind == "call_channel":
                self._call_channel(session, fds)
                fds = []
            elif kind == "ping":
                conn.send(spb.Frame(pong=spb.Pong(nonce=frame.ping.nonce)))
            elif kind == "goodbye":
                conn.close("client said goodbye")
            else:
                raise ProtocolError(f"a client may not send {kind} frames")
        except ProtocolError as exc:
            conn.protocol_error(exc)
        finally:
            for fd in fds:
                os.close(fd)

    def _hello(self, conn: Connection, hello: spb.Hello) -> None:
        if hello.protocol_version != wire.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello.protocol_version} is not supported "
                f"(this broker speaks {wire.PROTOCOL_VERSION})",
                code=9,
            )
        name = hello.client_name
        if not CLIENT_NAME.match(name):
            raise ProtocolError(
                f"client name {name!r} must be 1-64 characters of "
                "letters, digits and . _ : @ -, starting with a letter or digit"
            )
        resumes = self._resume_of(conn, name, hello.resume_token) if hello.resume_token else None
        if name in self._by_name:
            other = self._by_name[name]
            raise ProtocolError(
                f"client name {name!r} is in use by the session of pid {other.pid}", code=6
            )
        # Supplementary groups as the kernel captured them at connect (SO_PEERGROUPS).
        groups = getattr(conn.cred, "groups", None) or frozenset({conn.cred.gid})
        who = Identity(conn.cred.pid, conn.cred.uid, conn.cred.gid, frozenset(groups))
        try:
            policy.check_name(self.config, who, name)
            self._check_name_binding(who, name)
            policy.check_sessions(
                self.config, who, sum(1 for s in self.live_sessions() if s.uid == who.uid)
            )
        except NotAllowed as exc:
            raise ProtocolError(str(exc), code=7) from None
        except LimitReached as exc:
            raise ProtocolError(str(exc), code=8) from None
        session = Session(conn, name, who)
        try:
            session.view = ProcessView(conn.cred.pid)
        except OSError as exc:
            if self.config.verify == "always":
                # Another PID namespace, exited, or not permitted: say which (pidns.py).
                reason = pidns.inspect_refusal(conn.pidfd, conn.cred.pid, exc)
                session.release()
                raise ProtocolError(reason, code=7) from exc
        if not is_alive(session):
            session.release()
            raise ProtocolError("the process exited during the handshake")
        if resumes is not None:
            del self._resumable[resumes.token_sha256]
            session.resumed = True
            self.metrics.resumed_sessions.inc()
        writes: list[asyncio.Future[None]] = []
        if self.config.client_name_binding == "uid" and name not in self._name_uid:
            self._name_uid[name] = who.uid
            if self.journal is not None:
                # Awaited before the Welcome: a binding a session was told about survives.
                writes.append(
                    asyncio.wrap_future(
                        self.journal.submit(self.journal.journal.bind_name, name, who.uid)
                    )
                )
        self._stop_waiting(conn)
        self.sessions[conn] = session
        self._by_token[session.token] = session
        self._by_name[session.name] = session
        self._by_id[session.session_id] = session
        if self.journal is not None:
            session.start_time = process_start_time(conn.cred.pid, conn.pidfd)
            if session.start_time >= 0:
                session.issue_resume_token()
                record = SessionRecord(
                    session.resume_hash,
                    session.name,
                    session.uid,
                    session.pid,
                    session.start_time,
                    time.time(),
                )
                replaces = resumes.token_sha256 if resumes is not None else ""
                writes.append(
                    asyncio.wrap_future(
                        self.journal.submit(self.journal.journal.add_session, record, replaces)
                    )
                )
        if writes:
            self.spawn(self._welcome_when_written(session, writes))
        else:
            self._welcome(session)

    async def _welcome_when_written(
        self, session: Session, writes: list[asyncio.Future[None]]
    ) -> None:
        """Welcomes the session once its journal rows are on disk: a resume token a client
        holds is one a restarted daemon knows. If the journal refuses, the session is not
        resumable (no token)."""
        results = await asyncio.gather(*writes, return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            log.error(
                "session %s: the journal could not record it: it cannot be resumed after a restart",
                session.session_id,
            )
            session.resume_token = session.resume_hash = ""
        if not session.conn.closed:
            self._welcome(session)

    def _welcome(self, session: Session) -> None:
        session.conn.send(
            spb.Frame(
                welcome=spb.Welcome(
                    session_id=session.session_id,
                    token=session.token,
                    protocol_version=wire.PROTOCOL_VERSION,
                    max_frame_bytes=self.config.max_frame_bytes,
                    broker_pid=os.getpid(),
                    page_size=os.sysconf("SC_PAGE_SIZE"),
                    resume_token=session.resume_token,
                    resumed=session.resumed,
                    call_channels=self.calls is not None,
                )
            )
        )
        log.info(
            "session %s: client %r pid %d uid %d%s",
            session.session_id,
            session.name,
            session.pid,
            session.uid,
            " (resumed)" if session.resumed else "",
        )

    def _resume_of(self, conn: Connection, name: str, token: str) -> SessionRecord:
        """The previous daemon's session a Hello's resume token names, once it is shown to
        be this very process under the same name; else a ProtocolError (NOT_FOUND or
        PERMISSION_DENIED) and nothing changes: the record stays for its rightful owner."""
        record = self._resumable.get(token_hash(token)) if len(token) <= 256 else None
        if record is None:
            raise ProtocolError(
                "resume refused: the resume token is unknown or expired (sessions of the "
                f"previous daemon may resume for {self.resume_window_s:g} s after a start): open a "
                "new session",
                code=5,
            )
        cred = conn.cred
        problem = ""
        if record.uid != cred.uid:
            problem = f"it was issued to uid {record.uid}, not {cred.uid}"
        elif record.client != name:
            problem = f"it was issued to client name {record.client!r}, not {name!r}"
        elif record.pid != cred.pid or record.start_time != process_start_time(
            cred.pid, conn.pidfd
        ):
            problem = f"it was issued to another process (pid {record.pid}), not pid {cred.pid}"
        if problem:
            log.warning(
                "resume of session of %r refused for pid %d uid %d: %s",
                record.client,
                cred.pid,
                cred.uid,
                problem,
            )
            raise ProtocolError(f"resume refused: {problem}", code=7)
        return record

    def _expire_resumable(self) -> None:
        """resume_window_s after the start: sessions of the previous daemon that did not
        come back can no longer resume, and their processes are checked (`_unresumed`)."""
        gone = list(self._resumable.values())
        self._resumable.clear()
        if not gone:
            return
        log.info("%d session(s) of the previous daemon did not resume in time", len(gone))
        if self.journal is not None:
            self.journal.submit(self.journal.journal.end_sessions, *(r.token_sha256 for r in gone))
        for record in gone:
            self.spawn(self._unresumed(record))  # failures are logged, never lost

    async def _unresumed(self, record: SessionRecord) -> None:
        """A session that did not resume: if its process still runs (same pid and start
        time), has no session of its own now, and still maps a space it does not own, nothing
        checks what it reaches there any more (a sealed mapping's userfaultfd ended with the
        previous daemon): it is dealt with like a fenced client that still maps
        (on_fenced_still_mapped: killed through a pidfd, or reported)."""
        if any(s.pid == record.pid for s in self._by_id.values()):
            return  # it has a session now: verified and audited through it
        try:
            pidfd = sys_sock.pidfd_open(record.pid)
        except OSError:
            return  # exited
        try:
            if process_start_time(record.pid, pidfd) != record.start_time:
                return  # the pid is another process's now
            try:
                view = ProcessView(record.pid)
            except OSError:
                return
            spaces = [
                (s.space_id, s.dev, s.ino)
                for s in self.spaces.values()
                if not (s.owner == record.client and s.owner_uid == record.uid)
            ]

            def look() -> list[str]:
                # On a worker: a process with many mappings takes long to read.
                return [i for i, dev, ino in spaces if view.mappings_of(dev, ino)]

            try:
                mapped = await self.loop.run_in_executor(None, look)
            except OSError:
                return  # gone meanwhile
            finally:
                view.close()
            if not mapped:
                return
            action = "reported"
            if self.config.on_fenced_still_mapped == "kill":
                try:
                    sys_sock.pidfd_send_signal(pidfd, signal.SIGKILL)
                    action = "killed"
                except OSError as exc:
                    action = f"not killed ({exc})"
            self.fenced_total += 1
            self.metrics.fenced.labels("unresumed").inc()
            log.warning(
                "client %r (pid %d, uid %d) did not resume its session within %g s and still "
                "maps %s, which nothing checks any more: %s (on_fenced_still_mapped)",
                record.client,
                record.pid,
                record.uid,
                self.resume_window_s,
                ", ".join(mapped),
                action,
            )
        finally:
            os.close(pidfd)

    def _check_name_binding(self, who: Identity, name: str) -> None:
        """A client name is its first user's uid's for the daemon's life (grants are addressed
        to names: another uid taking one would inherit them), unless client_names says whose
        it is."""
        if self.config.client_name_binding != "uid" or name in self.config.client_names:
            return
        bound = self._name_uid.get(name)
        if bound is not None and bound != who.uid:
            raise NotAllowed(
                f"client name {name!r} is bound to uid {bound}, which used it first; {who} may "
                "not use it (client_name_binding = uid; reserve names with client_names)"
            )
        if bound is None:
            # Each new name is kept for good (and written to the journal before the Welcome):
            # a uid that loops fresh names would grow both without end.
            limit = self.config.max_client_names_per_uid
            held = sum(1 for uid in self._name_uid.values() if uid == who.uid)
            if held >= limit:
                raise LimitReached(
                    "max_client_names_per_uid",
                    limit,
                    f"uid {who.uid} has used {held} client names; {name!r} would be one more",
                )

    def _offer(self, session: Session, tag: int, fds: list[int]) -> None:
        if tag == 0 or tag in session.offered:
            raise ProtocolError(f"fd_offer tag {tag} is zero or already pending")
        if len(session.offered) >= self.config.max_offered_fds:
            raise ProtocolError(
                f"more than {self.config.max_offered_fds} offered fds pending "
                "(limit max_offered_fds)",
                code=8,
            )
        session.offered[tag] = fds[0]

    def _mapped(self, session: Session, mapped: spb.Mapped) -> None:
        space = self.spaces.get(mapped.space_id)
        if space is None or mapped.space_id not in session.attached:
            raise ProtocolError(f"mapped report for {mapped.space_id!r}, which is not attached")
        if mapped.length != space.size or mapped.address % space.page_size:
            raise ProtocolError(
                f"mapped report of {mapped.length} bytes at {mapped.address:#x}: a VA client "
                f"maps the whole space ({space.size} bytes) at a page-aligned address"
            )
        session.va_base[space.space_id] = mapped.address

    def _isolation(self, session: Session, said: spb.Isolation) -> None:
        """A client's statement that its isolation of an attached space is logical only (or
        no longer): kept per attachment, shown in listings and reports. Bounded, and only for
        a space it has attached: it is the client's word about itself, nothing more."""
        if said.space_id not in session.attached:
            raise ProtocolError(f"isolation note for {said.space_id!r}, which is not attached")
        note = said.logical_only
        if len(note.encode()) > MAX_ISOLATION_NOTE_BYTES:
            raise ProtocolError(
                f"isolation note of {len(note.encode())} bytes; at most {MAX_ISOLATION_NOTE_BYTES}"
            )
        if note:
            session.isolation[said.space_id] = note
        else:
            session.isolation.pop(said.space_id, None)

    def _call_channel(self, session: Session, fds: list[int]) -> None:
        """A CallChannel frame: its one fd, a Unix stream socket whose other end this
        session's process holds, becomes a connection on which the session's calls come and
        are answered (`CallChannelHost`). Anything else is a protocol error (the fds closed)."""
        try:
            if self.calls is None:
                raise ProtocolError("this broker takes no calls on the session socket", code=12)
            if len(fds) != 1:
                raise ProtocolError(f"call_channel carries exactly one fd, not {len(fds)}")
            if session.channel is not None:
                raise ProtocolError("this session has a call channel already")
            try:
                sock = sys_sock.adopt_unix_stream(fds[0])
            except ValueError as exc:
                raise ProtocolError(f"call_channel: {exc}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        fds.clear()  # the socket owns it now
        try:
            cred = sys_sock.peer_credentials(sock)
            if cred.pid != session.pid:
                raise ProtocolError(
                    f"the call channel's other end was made by pid {cred.pid}, not by this "
                    f"session's process (pid {session.pid})",
                    code=7,
                )
            pidfd = sys_sock.peer_pidfd(sock)
        except OSError as exc:
            sock.close()
            raise ProtocolError(f"call channel: cannot identify its other end: {exc}") from None
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        session.channel = Connection(
            self.loop,
            sock,
            CallChannelHost(self, session),
            self.config.max_frame_bytes,
            cred,
            pidfd,
            **_connection_limits(self.config),
        )

    def _call(self, session: Session, call: spb.Call, reply: Connection) -> asyncio.Task[None]:
        """A control call on the session socket or its call channel (`reply`): run like its
        gRPC twin, answered in turn on the connection it came on. Returns its task."""
        if self.calls is None:
            raise ProtocolError("this broker takes no calls on the session socket", code=12)
        if call.id == 0 or call.id in session.calls:
            raise ProtocolError(f"call id {call.id} is zero or already in flight")
        if len(session.calls) >= MAX_CALLS_IN_FLIGHT:
            raise ProtocolError(
                f"more than {MAX_CALLS_IN_FLIGHT} calls in flight on one session", code=8
            )
        calls = self.calls

        async def run() -> None:
            try:
                result = await calls.run(session, call)
            except asyncio.CancelledError:
                return  # the caller gave up or left: nothing to answer
            finally:
                forget()
            if not reply.closed:
                reply.send(spb.Frame(call_result=result))

        def forget() -> None:
            if session.calls.get(call.id) is task:
                del session.calls[call.id]

        def done(task: asyncio.Task[None]) -> None:
            forget()  # again: a task cancelled before its first step never runs its body
            self._tasks.discard(task)

        task = self.loop.create_task(run())
        session.calls[call.id] = task
        self._tasks.add(task)
        task.add_done_callback(done)
        return task

    def _seal_overdue(self, session: Session, space_id: str, attached_at: float) -> None:
        """A sealed-mode attachment whose Sealed report has not come: fenced (the process
        holds a read-write description of the space and nothing else is known of it)."""
        if (
            session.conn.closed
            or space_id not in session.sealing
            or session.attached_at.get(space_id) != attached_at
        ):
            return
        reason = (
            f"attached to {space_id} in sealed mode but did not report its sealed mapping "
            f"in time (seal_timeout_ms = {self.config.seal_timeout_ms}, plus "
            "revoke_deadline_us_per_range for each range it holds)"
        )
        log.warning("session %s (%r): %s", session.session_id, session.name, reason)
        self.enforcer.fence_soon(session, "sealing", reason)

    def _sealed(self, session: Session, sealed: spb.Sealed, fds: list[int]) -> None:
        """A sealed VA client's mapping and userfaultfd: registered by the broker, checked
        against the kernel's view, then served. A client that fails the check is told why and
        fenced (it maps the space and the broker does not control that mapping)."""
        space = self.spaces.get(sealed.space_id)
        if space is None or sealed.space_id not in session.sealing:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(
                f"sealed report for {sealed.space_id!r}, which this session did not attach "
                "in sealed mode (or already reported)"
            )
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(
                f"a sealed report carries exactly one fd (its userfaultfd), not {len(fds)}"
            )
        may_write = session.sealing.pop(space.space_id)
        self.spawn(self._check_sealed(session, space, sealed, sys_uffd.Uffd(fds[0]), may_write))

    async def _check_sealed(
        self,
        session: Session,
        space: Space,
        sealed: spb.Sealed,
        uffd: sys_uffd.Uffd,
        may_write: bool,
    ) -> None:
        registered = False
        try:
            # The client closes its copy of the userfaultfd right after sending it: give that
            # close a moment before its fd table is held against it.
            view = session.view
            for _ in range(50):
                if view is None or not view.userfaultfds():
                    break
                await asyncio.sleep(0.002)
            facts = None
            if view is not None:
                # Its mappings, fds and userfaultfds, read on a worker: a process with many
                # mappings takes long to read, and the loop serves everyone.
                session.retain()
                try:
                    facts = await self.loop.run_in_executor(
                        None, functools.partial(_sealed_facts, view, space.dev, space.ino)
                    )
                finally:
                    session.release()
            error, registered = self._accept_sealed(
                session, space, sealed.address, sealed.length, uffd, may_write, facts
            )
        except Exception as exc:  # a client's mistake never kills the daemon
            log.exception("checking the sealed mapping of %r", session.name)
            error = f"its sealed mapping could not be checked ({exc})"
        session.conn.send(
            spb.Frame(sealed_result=spb.SealedResult(space_id=space.space_id, error=error or ""))
        )
        resumed = space.space_id in session.resyncing
        session.resyncing.discard(space.space_id)
        if error is None:
            if resumed:
                self.spawn(self._resync_sealed(session, space))
            return
        if registered:
            # Closing the uffd would hand the client the whole file: keep serving it, inert.
            mapping = self._sealed_mapping(session, space, sealed.address, uffd)
            mapping.retire()
            self.faults.add(mapping)
        else:
            uffd.close()
        log.warning(
            "session %s (%r): sealed mapping refused: %s", session.session_id, session.name, error
        )
        self.spawn(
            self.enforcer.fence(session, "sealing", f"its sealed mapping was refused: {error}")
        )

    def _sealed_mapping(
        self, session: Session, space: Space, address: int, uffd: sys_uffd.Uffd
    ) -> SealedMapping:
        return SealedMapping(
            uffd,
            space.fd,
            space.space_id,
            session.name,
            session.session_id,
            session.pid,
            os.dup(session.pidfd),
            address,
            space.size,
            space.page_size,
            view=_view_of(session.pid),
        )

    def _accept_sealed(
        self,
        session: Session,
        space: Space,
        address: int,
        length: int,
        uffd: sys_uffd.Uffd,
        may_write: bool,
        facts: tuple[list[Vma], list[int], list[int]] | None,
    ) -> tuple[str | None, bool]:
        """(why the sealed mapping is refused or None, whether the range got registered).
        `facts`: the process's mappings of the space, fds of it and userfaultfds (None: its
        view cannot be read)."""
        if length != space.size or address == 0 or address % space.page_size:
            return (
                f"a sealed mapping is the whole space ({space.size} bytes) at a page-aligned "
                f"address, not {length} bytes at {address:#x}",
                False,
            )
        if facts is None:
            return "the broker cannot read its mappings (sealed mode needs /proc)", False
        vmas, held, own = facts
        target = os.readlink(f"/proc/self/fd/{uffd.fd}")
        if target != "anon_inode:[userfaultfd]":
            return f"the fd it sent is {target}, not a userfaultfd", False
        # A sealed mapping of an earlier attachment of this process stays (it cannot be
        # unmapped), retired: served by the broker, every touch refused. It is not this one.
        retired = {
            m.base
            for m in self.faults.of_process(session.pid, space.space_id)
            if m.inert and m.base != address
        }
        vmas = [v for v in vmas if v.start not in retired]
        whole = [
            v for v in vmas if v.start == address and v.end == address + length and v.offset == 0
        ]
        if len(vmas) != 1 or not whole or not whole[0].shared:
            found = ", ".join(f"{v.start:#x}-{v.end:#x} {v.perms} +{v.offset:#x}" for v in vmas)
            return (
                "it must map the space exactly once, whole and shared, at the address it "
                f"reports ({address:#x}); it maps: {found or 'nothing'}",
                False,
            )
        if whole[0].writable and not may_write:
            return "it mapped the space writable, but holds no read-write grant", False
        if held:
            return f"it still holds fd {held[0]} of the space", False
        if own:
            return (
                f"it holds a userfaultfd of its own (fd {own[0]}): one could map in pages "
                "past the broker",
                False,
            )
        base = sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR
        try:
            uffd.register(address, length, base)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return "its mapping is registered with another userfaultfd", False
            return f"its mapping could not be registered with its userfaultfd ({exc})", False
        # The flags show the registration took place in *this* process (a userfaultfd made by
        # another process would register that one's memory): without write-protect mode now,
        # with it after the second registration.
        before = sys_uffd.vma_flags(session.pid, address)
        missing = {"sl", "um", "ui", "dc"} - before
        if missing or "uw" in before:
            return (
                "its mapping is not sealed and registered as sealed mode requires (smaps "
                f"VmFlags {' '.join(sorted(before))}; "
                f"missing {' '.join(sorted(missing)) or 'none'})",
                True,
            )
        uffd.register(address, length, base | sys_uffd.MODE_WP)
        after = sys_uffd.vma_flags(session.pid, address)
        if "uw" not in after:
            return "the userfaultfd it sent is not one of its own process", True
        if space.space_id not in session.attached or session.conn.closed:
            return "it detached meanwhile", True
        mapping = self._sealed_mapping(session, space, address, uffd)
        mapping.reset(*space.table.allowed_sets(session.name))
        self.faults.add(mapping)
        session.sealed[space.space_id] = mapping
        session.va_base[space.space_id] = address
        log.info(
            "session %s (%r): sealed mapping of %s at %#x accepted (%s)",
            session.session_id,
            session.name,
            space.space_id,
            address,
            "read-write" if whole[0].writable else "read-only",
        )
        return None, True

    def _fault_refused(self, mapping: SealedMapping, why: str) -> None:
        """From the fault thread: a touch was refused (the process got SIGBUS)."""

        def report() -> None:
            log.warning(
                "client %r (pid %d) %s: refused (SIGBUS)%s",
                mapping.client,
                mapping.pid,
                why,
                "; killed after repeated refusals" if mapping.killed else "",
            )

        self.loop.call_soon_threadsafe(report)

    def _ack(
        self,
        session: Session,
        space_id: str,
        seq: int,
        refusal: str | None,
        withdrawn: tuple[tuple[int, int], ...] = (),
        in_flight: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """A RevokeAck (refusal None) or RevokeRefused: judged now, against what the client may
        hold now. `withdrawn`: what an acknowledging client says it gave up, `in_flight`: its
        buffers lost in the revoked memory; both for the report."""
        awaited = session.pending_acks.pop((space_id, seq), None)
        if awaited is None:
            what = "revoke_refused" if refusal is not None else "revoke_ack"
            raise ProtocolError(
                f"{what} for space {space_id!r} seq {seq}, "
                "which this session was not asked to acknowledge"
            )
        if withdrawn:
            self._check_withdrawn(session, space_id, withdrawn)
        if in_flight:
            _check_in_flight(in_flight, awaited.ranges)
        awaited.withdrawn = withdrawn
        awaited.in_flight = in_flight
        now = time.perf_counter()
        if refusal is not None:
            awaited.settle(Verdict.REFUSED, refusal, now)
            return
        sealed = session.sealed.get(space_id)
        if sealed is not None and len(awaited.ranges) < OFFLOAD_RANGES:
            # It says it zapped: from now on a touch of those pages is refused, so whatever
            # verification finds present now stays what it was. (A large one: in _judge_later.)
            sealed.set_access(awaited.ranges)
        judged = None
        if len(awaited.ranges) < OFFLOAD_RANGES:
            judged = self.judge_inline(session, awaited.space_id, awaited.ranges)
        if judged is None:
            # A large revocation, or a process with many mappings, or one whose walk was slow
            # (or not looked at yet: a hostile client with tens of thousands of mappings costs
            # tens of milliseconds to read): the kernel's view is read and compared on a worker
            # thread, where the reads release the GIL and the loop keeps taking acks. The ack
            # counts from its arrival; the verdict follows, and the revocation waits for it.
            awaited.acked_at = now
            self.spawn(self._judge_later(session, awaited))
            return
        verdict, reason = judged
        if verdict is Verdict.UNVERIFIED:
            awaited.acked_at = now
            self.spawn(self._settle_unverified(session, awaited, reason))
            return
        awaited.settle(verdict, reason, now)

    async def _settle_unverified(self, session: Session, awaited: Ack, reason: str) -> None:
        """A verdict of `unverified` (a live process that could not be read) stands only if
        the process does not exit right after: an exiting one loses its memory before its
        pidfd says it exited, and is `lost`, not a client to fence."""
        if await gone_soon(session):
            awaited.settle(Verdict.LOST, "the process exited", awaited.acked_at)
        else:
            awaited.settle(Verdict.UNVERIFIED, reason, awaited.acked_at)

    def _check_withdrawn(
        self, session: Session, space_id: str, withdrawn: tuple[tuple[int, int], ...]
    ) -> None:
        """What a client says it gave up goes into the owner's report, so it must be true as
        far as the broker can tell: a few valid ranges of the space, each held by the client
        now (what it still holds but no longer uses). Otherwise the frame is refused."""
        if len(withdrawn) > MAX_WITHDRAWN:
            raise ProtocolError(
                f"revoke_ack lists {len(withdrawn)} withdrawn ranges; at most {MAX_WITHDRAWN}"
            )
        space = self.spaces.get(space_id)
        if space is None:
            raise ProtocolError(f"revoke_ack lists withdrawn ranges of no space {space_id!r}")
        try:
            spans = space.table.check_spans(withdrawn)
        except InvalidRange as exc:
            raise ProtocolError(f"revoke_ack lists a bad withdrawn range: {exc}") from None
        for offset, length in spans:
            if space.table.effective_access(session.name, offset, length) is Access.NONE:
                raise ProtocolError(
                    f"revoke_ack lists {offset:#x}+{length:#x} as withdrawn, which this client "
                    "does not hold"
                )

    async def _judge_later(self, session: Session, awaited: Ack) -> None:
        try:
            judge = self.judge_prepared(session, awaited.space_id, awaited.ranges)
            sealed = session.sealed.get(awaited.space_id)
            if sealed is not None and len(awaited.ranges) >= OFFLOAD_RANGES:
                judge = _after(functools.partial(sealed.set_access, awaited.ranges), judge)
            verdict, reason = await self.loop.run_in_executor(
                None, without_collector(self._timed(judge))
            )
        except Exception as exc:  # never leave a revocation waiting on a lost verdict
            verdict, reason = Verdict.UNVERIFIED, f"its verification failed ({exc})"
        if verdict is Verdict.UNVERIFIED:
            await self._settle_unverified(session, awaited, reason)
            return
        awaited.settle(verdict, reason, awaited.acked_at)

    async def judge(
        self, session: Session, space_id: str, ranges: Sequence[AccessRange]
    ) -> tuple[Verdict, str]:
        """Asks the kernel whether the process reaches anything of `ranges` beyond what it may
        hold now (see `allowance`): on the loop when that is quick (`judge_inline`), else on a
        worker thread."""
        judged = self.judge_inline(session, space_id, ranges)
        if judged is not None:
            return judged
        judge = self.judge_prepared(session, space_id, ranges)
        return await self.loop.run_in_executor(None, without_collector(self._timed(judge)))

    def _timed(self, judge: Callable[[], tuple[Verdict, str]]) -> Callable[[], tuple[Verdict, str]]:
        """`judge`, its duration observed as verification on a worker thread."""

        def timed() -> tuple[Verdict, str]:
            started = time.perf_counter()
            try:
                return judge()
            finally:
                self.metrics.verify_on_worker.observe(time.perf_counter() - started)

        return timed

    def judge_inline(
        self, session: Session, space_id: str, ranges: Sequence[AccessRange]
    ) -> tuple[Verdict, str] | None:
        """`judge` on the loop, by a walk of at most INLINE_MAPPINGS mappings; None when the
        process is not known to be quick to look at (more mappings, not looked at yet, or a
        walk of it was slow once; see `ProcessView.quick_to_walk`): the caller judges it on a
        worker thread."""
        view = session.view
        if view is not None and not view.quick_to_walk(INLINE_MAPPINGS):
            return None
        slow = view.slow_walks if view is not None else 0
        started = time.perf_counter()
        try:
            judged = self.judge_prepared(session, space_id, ranges, INLINE_MAPPINGS)()
        except TooManyMappings:
            return None
        finally:
            if view is not None and view.slow_walks != slow:
                self.metrics.slow_walks.inc()
        self.metrics.verify_on_loop.observe(time.perf_counter() - started)
        return judged

    def judge_prepared(
        self,
        session: Session,
        space_id: str,
        ranges: Sequence[AccessRange],
        walk_limit: int | None = None,
    ) -> Callable[[], tuple[Verdict, str]]:
        """`judge` in two halves: what the client may hold is read now, on the loop; the
        returned function asks the kernel and compares (it touches no broker state, so it may
        run on a worker thread, with `walk_limit` None: see `check_reach`)."""
        space = self.spaces.get(space_id)
        view = session.view
        if space is None or view is None or self.config.verify == "off":
            return lambda: (Verdict.ACKED, "")
        allowance = self.allowance(session, space, ranges)
        if allowance is None:
            return lambda: (Verdict.ACKED, "")
        allowed, fd_allowed = allowance
        dev, ino, page = space.dev, space.ino, space.page_size
        pidfd = session.pidfd
        return functools.partial(
            judge_view, view, dev, ino, allowed, page, ranges, fd_allowed, pidfd, walk_limit
        )

    def allowance(
        self, session: Session, space: Space, ranges: Sequence[AccessRange] | None
    ) -> tuple[Allowed, bool] | None:
        """What the process of `session` may reach of `space` (within `ranges`, or all of it),
        and whether it may hold an fd of it; None when it may reach everything.

        The kernel's view is per process, so every live session of that process counts: the
        owner's own session (an identity: name and uid) maps the whole space by right, an fd
        client may hold the fd, and each session's effective access adds up. A VA client may
        hold the fd only while it is being mapped (before its Mapped report, for at most the
        revoke deadline).
        """
        sessions = [session] + [
            s
            for s in self._by_id.values()
            if session.pid and s.pid == session.pid and s is not session
        ]
        readable, writable = RangeSet(), RangeSet()
        fd_allowed = False
        page = space.page_size
        for s in sessions:
            if self.is_owner(s, space):
                return None
            kind = s.attached.get(space.space_id)
            if kind is None or space.deleting or s.conn.closed:
                continue
            if kind is Attachment.FD or self.still_mapping(s, space.space_id):
                fd_allowed = True
            if ranges is None or len(ranges) > FEW_RANGES:
                # The whole space's sets (array slices) beat a lookup per range: what lies
                # outside `ranges` is not examined anyway.
                r_set, w_set = space.table.allowed_sets(s.name)
                if not readable:
                    readable, writable = r_set, w_set  # the usual case: one session
                else:
                    readable.add_many(r_set)
                    writable.add_many(w_set)
                continue
            for r in ranges:
                for held in space.table.effective_in(s.name, r.offset, r.length):
                    first, last = held.offset // page, (held.offset + held.length) // page
                    readable.add(first, last)
                    if held.access is Access.RW:
                        writable.add(first, last)
        sealed = (
            frozenset(m.base for m in self.faults.of_process(session.pid, space.space_id))
            if session.pid
            else frozenset()
        )
        return Allowed(readable, writable, sealed), fd_allowed

    def still_mapping(self, session: Session, space_id: str) -> bool:
        """A VA client between its attach and the broker's check of its mapping (its Mapped
        report), for at most the revoke deadline: it holds the fd and is making its mapping (a
        sealed one maps the whole space before the broker serves its faults)."""
        return (
            space_id in session.attached
            and space_id not in session.va_base
            and session.attached[space_id] is not Attachment.FD
            and time.monotonic() - session.attached_at.get(space_id, 0.0)
            < self.config.revoke_deadline_ms / 1000
        )

    def is_owner(self, session: Session, space: Space) -> bool:
        """The owner is an identity (name and uid), never a name alone."""
        return session.name == space.owner and session.uid == space.owner_uid

    def on_closed(self, conn: Connection) -> None:
        if conn not in self.sessions:
            return
        session = self.sessions.pop(conn)
        if session is None:
            self._stop_waiting(conn)
            return
        self._by_token.pop(session.token, None)
        self._by_id.pop(session.session_id, None)
        if self._by_name.get(session.name) is session:
            del self._by_name[session.name]
        if session.resume_hash and not self.stopping and self.journal is not None:
            # Ended by its client or fenced: never resumable. (A daemon that stops keeps its
            # sessions resumable for the next one.)
            self.journal.submit(self.journal.journal.end_sessions, session.resume_hash)
        for fd in session.offered.values():
            os.close(fd)
        session.offered.clear()
        for task in list(session.calls.values()):
            task.cancel()  # its caller is gone: changes go on, reports say caller_gone
        if session.channel is not None:
            session.channel.close(f"session ended: {conn.close_reason}")
        for awaited in session.pending_acks.values():
            awaited.settle(Verdict.LOST, f"session ended: {conn.close_reason}")
        session.pending_acks.clear()
        self._look_after_close(session)
        for space_id in list(session.attached):
            space = self.spaces.get(space_id)
            if space is not None:
                self._detach(space, session)
        for space in list(self.spaces.values()):
            if space.ephemeral and self.is_owner(session, space) and not space.deleting:
                self.spawn(self._queue_delete(space, "owner session ended"))
        session.release()
        log.info(
            "session %s (%r, pid %d) ended: %s",
            session.session_id,
            session.name,
            session.pid,
            conn.close_reason,
        )

    def _look_after_close(self, session: Session) -> None:
        """A session that ended otherwise than by a fence or the daemon's stop said "I let go"
        of every space it was attached to, like a detach: its process, if it lives on, must
        reach none of them beyond what its other sessions may. It gets fence_grace_ms to let
        go (a client the broker cut off learns it from the end of its stream), then it is
        fenced (`fenced_total{reason="closed"}`) and, still reaching, killed. A space it owns
        is its own to map; one being deleted is no longer guest memory."""
        if self.stopping or session.fencing is not None or session.view is None:
            return
        reach = [
            Reach(space.space_id, space.dev, space.ino, space.page_size)
            for space in (self.spaces.get(i) for i in session.attached)
            if space is not None and not space.deleting and not self.is_owner(session, space)
        ]
        if not reach:
            return
        session.retain()  # the view and pidfd outlive the session until the look is done
        self.spawn(self._check_closed(session, reach))

    async def _check_closed(self, session: Session, reach: list[Reach]) -> None:
        try:
            deadline = time.monotonic() + self.config.fence_grace_ms / 1000
            while True:
                if not is_alive(session):
                    return
                live = [r for r in reach if r.space_id in self.spaces]
                problem = await still_reaches(self, session, live)
                if problem is None:
                    return
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(CLOSE_POLL_S)
            reason = f"ended its session but still reaches {problem}"
            await self.enforcer.fence(session, "closed", reason, also=live)
        finally:
            session.release()

    async def _queue_delete(self, space: Space, why: str) -> None:
        try:
            await self.change(space, "delete", lambda: self._delete_job(space, why, "fence"))
        except UnknownObject:
            pass

    # -- spaces --------------------------------------------------------------------------------

    def space(self, space_id: str) -> Space:
        space = self.spaces.get(space_id)
        if space is None or space.deleting:
            raise UnknownObject(f"no space {space_id!r}")
        return space

    def owned_space(self, session: Session, space_id: str) -> Space:
        space = self.space(space_id)
        if not self.is_owner(session, space):
            raise NotAllowed(
                f"client {session.name!r} (uid {session.uid}) is not the owner of space "
                f"{space_id} (owner: {space.owner!r}, uid {space.owner_uid})"
            )
        return space

    # -- the journal and the fd store ---------------------------------------------------------

    @staticmethod
    def _record(space: Space) -> SpaceRecord:
        seals = -1
        if space.backing is not BackingKind.GUEST_MEMFD:
            seals = sys_memfd.get_seals(space.fd)
        return SpaceRecord(
            space_id=space.space_id,
            name=space.name,
            size=space.size,
            backing=space.backing.value,
            page_size=space.page_size,
            owner=space.owner,
            owner_uid=space.owner_uid,
            imported=space.imported,
            regions=tuple((r.gpa, r.offset, r.size) for r in space.regions),
            dev=space.dev,
            ino=space.ino,
            seals=seals,
            created_unix=space.created_unix,
        )

    async def _add_space(self, space: Space) -> None:
        """Makes a new space known: its journal row first, then `self.spaces`, then its fd
        into systemd's fd store, all before the call that made it returns. If the journal
        refuses the row, the space is closed and the call fails; nobody saw it. Ephemeral
        spaces are neither journaled nor stored: they end with their owner's session.

        The row is written on the journal's thread, after whatever it is doing (a fold of the
        change log can take ~100 ms): the loop serves everyone else meanwhile. Until the row
        is in, the space is in `_creating` only: counted against the quotas, listed nowhere,
        so nothing can attach to it, change it, or delete it. A caller that gives up while it
        waits does not stop it: the space is then kept (its owner finds it in ListSpaces) or
        closed, as if the call had finished."""
        if self.journal is None or space.ephemeral:
            self.spaces[space.space_id] = space
            return
        journal = self.journal
        try:
            # Queued now, in this loop step: ahead of any journal write that follows.
            written = asyncio.wrap_future(
                journal.submit(journal.journal.add_space, self._record(space), space.table.seq)
            )
        except BaseException:
            space.close()
            raise
        self._creating[space.space_id] = space

        async def persist() -> None:
            try:
                await written
            except asyncio.CancelledError:
                # The daemon is stopping (shutdown cancels it): the row may still be written;
                # the next start then finds it without an fd and drops it, as it says.
                log.warning(
                    "space %s: the daemon stopped while it was being created", space.space_id
                )
                raise
            except BaseException:
                log.exception("journal: cannot record new space %s: refused", space.space_id)
                raise
            else:
                self.spaces[space.space_id] = space
                if self.fd_store:
                    systemd.fd_store_add(space.space_id, space.fd)
            finally:
                if self._creating.pop(space.space_id, None) is not None and (
                    self.spaces.get(space.space_id) is not space
                ):
                    space.close()

        task = self.loop.create_task(persist())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)
        if space.fd < 0 or self.spaces.get(space.space_id) is not space:
            raise UnknownObject(f"space {space.space_id} went while it was being created")

    def _journal_change(
        self, space: Space, key: str, kind: str, spans: Sequence[tuple[int, int]]
    ) -> JournalWrite | None:
        """The change `kind` over `spans` just made to the grants of client `key` (SHARED: to
        the shared attribute), captured and written to the journal now, before it is carried
        out, so that it is in the journal before anyone is told it is done (membrokerd.journal):
        appended to the change log on the loop (one write, no thread hop), or, for a change that
        writes a large set whole, folded into the database on the journal's thread while the
        change is carried out. `_journal_wait` before the call returns."""
        if self.journal is None or space.ephemeral:
            return None
        started = time.perf_counter()
        future: asyncio.Future[None] = self.loop.create_future()
        try:
            change = self.journal.compaction.change(space.space_id, space.table, key, kind, spans)
            if change_bytes(change) < LARGE_CHANGE_BYTES:
                self.journal.log(change)
                future.set_result(None)
            else:
                future = asyncio.wrap_future(self.journal.log_large(change))
        except Exception as exc:  # never between the table's change and carrying it out
            future.set_exception(exc)
        # Retrieved here: a call that fails before waiting leaves no "never retrieved" behind.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return JournalWrite(key, kind, future, time.perf_counter() - started)

    async def _journal_wait(self, space: Space, write: JournalWrite | None) -> Exception | None:
        """The outcome of a `_journal_change` write, waited for if it is still being written (a
        large one); its time in all is what the journal added to the call
        (membroker_journal_wait_seconds). A failed write is returned, not raised: the change is
        in force in the table, so it was carried out (clients told, revocations verified) all
        the same, and only now does the call fail, saying it will not survive a restart
        (`_saved`)."""
        if write is None or self.journal is None:
            return None
        started = time.perf_counter()
        try:
            try:
                await asyncio.shield(write.future)  # done already, unless a large change
            finally:
                self.metrics.journal_wait.labels(write.kind).observe(
                    write.seconds + time.perf_counter() - started
                )
        except Exception as exc:
            log.error("journal write failed: %s", exc)
            # The next change of this set must write it whole: its logged operations miss
            # this one.
            self.journal.compaction.logged[(space.space_id, write.key)] = (
                self.journal.compaction.max_ops
            )
            return exc
        return None

    def _journal_forget(self, client: str) -> None:
        """A fenced client's grants are gone from every space: in the journal's change log
        before the fencing goes on. When the log does not take it, it goes to the database on
        the journal's thread (with the log's current generation, in order), not waited for;
        failing that too, it is logged, and the drop stays in force here but not after a
        restart."""
        if self.journal is None:
            return
        forget = self.journal.compaction.forget
        changes = [
            forget(space.space_id, space.table, client)
            for space in self.spaces.values()
            if not space.ephemeral
        ]
        if not changes:
            return
        try:
            self.journal.log(*changes)
            return
        except Exception as exc:  # the fence goes on: its drop stays in force here
            log.error(
                "journal write failed: %s (fence of %r): writing it to the database", exc, client
            )

        def lost(why: object) -> None:
            log.error(
                "journal: the fence of %r is not in the journal (%s): a restart gives its "
                "grants back",
                client,
                why,
            )

        try:
            folded = self.journal.log_large(*changes)
        except Exception as exc:
            lost(exc)
            return
        folded.add_done_callback(lambda f: None if f.exception() is None else lost(f.exception()))

    async def _journal_gone(self, space: Space) -> None:
        if self.journal is None or space.ephemeral:
            return
        self.journal.compaction.space_gone(space.space_id)
        try:
            await self.journal.write(self.journal.journal.delete_space, space.space_id)
        except Exception:
            # Its fd leaves the store all the same: at the next start the journal's row has no
            # fd, and is dropped.
            log.exception("journal: cannot remove deleted space %s", space.space_id)
        if self.fd_store:
            systemd.fd_store_remove(space.space_id)

    def restore(self, writer: Writer, stored: dict[str, int], fd_store: bool) -> int:
        """At start: takes the journal's spaces back, each with its fd from systemd's fd store
        (`stored`, by space id; every fd in it is used or closed here). A journal space without
        an fd, or whose fd is not the backing it recorded, and an fd without a journal space,
        are logged and dropped (from the journal and the store). Returns the spaces restored."""
        self.journal = writer
        self.fd_store = fd_store
        journal = writer.journal
        try:
            contents = journal.load()
        except BaseException:
            for fd in stored.values():
                os.close(fd)
            raise
        if self.config.client_name_binding == "uid":
            self._name_uid.update(contents.names)
        self._resumable = {r.token_sha256: r for r in contents.sessions}
        if self._resumable:
            log.info(
                "journal: %d session(s) of the previous daemon may resume within %g s",
                len(self._resumable),
                self.resume_window_s,
            )
            self.loop.call_later(self.resume_window_s, self._expire_resumable)
        restored = 0
        for state in contents.spaces:
            rec = state.record
            fd = stored.pop(rec.space_id, -1)
            if fd < 0:
                log.warning(
                    "journal: space %s (%r, owner %r uid %d, %d bytes) has no fd in systemd's fd "
                    "store (the service was stopped, not restarted, or runs without the fd "
                    "store): dropped",
                    rec.space_id,
                    rec.name,
                    rec.owner,
                    rec.owner_uid,
                    rec.size,
                )
                journal.delete_space(rec.space_id)
                continue
            try:
                space = self._restored_space(rec, fd)
            except (JournalError, BadRequest, OSError, ValueError) as exc:
                log.error("journal: space %s cannot be restored (%s): dropped", rec.space_id, exc)
                os.close(fd)
                journal.delete_space(rec.space_id)
                systemd.fd_store_remove(rec.space_id)
                continue
            try:
                restore_table(space.table, state)
            except (JournalError, ValueError) as exc:
                log.error(
                    "journal: the access table of space %s cannot be restored (%s): dropped",
                    rec.space_id,
                    exc,
                )
                space.close()
                journal.delete_space(rec.space_id)
                systemd.fd_store_remove(rec.space_id)
                continue
            self.spaces[space.space_id] = space
            self._restore_history(space, contents.revocations.get(space.space_id, []))
            logged = writer.compaction.logged
            for op in state.ops:
                logged[(space.space_id, op.client)] = logged.get((space.space_id, op.client), 0) + 1
            self.metrics.restored_spaces.inc()
            restored += 1
            log.info(
                "space %s restored: %r of %r (uid %d), %s, %d bytes, seq %d, %d client(s) "
                "with grants, %d shared page range(s)",
                space.space_id,
                space.name,
                space.owner,
                space.owner_uid,
                space.backing.value,
                space.size,
                space.table.seq,
                len(space.table.clients()),
                len(state.shared),
            )
        for space_id, fd in stored.items():
            log.warning(
                "fd store: %s has no space in the journal: dropped (fd closed, removed from "
                "the store)",
                space_id,
            )
            os.close(fd)
            systemd.fd_store_remove(space_id)
        stored.clear()
        return restored

    def _restore_history(self, space: Space, reports: list[str]) -> None:
        """The space's revocation reports of before the restart, for ListRevocations (one
        that cannot be read is logged and left out)."""
        history = self.queue(space).history
        for text in reports:
            try:
                history.append(report_from_json(text))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("journal: a revocation report of %s is unreadable: %s", space, exc)

    @staticmethod
    def _restored_space(rec: SpaceRecord, fd: int) -> Space:
        """A Space for a journal record and the fd the store gave back, once the fd is shown
        to be that very backing: same inode, size, kind, page size and seals."""
        info = sys_memfd.describe_fd(fd)
        backing = BackingKind(rec.backing)
        problems = []
        if (info.dev, info.ino) != (rec.dev, rec.ino):
            problems.append(
                f"its fd is inode {info.dev}:{info.ino}, the journal says {rec.dev}:{rec.ino}"
            )
        if info.kind != backing.value:
            problems.append(f"its fd is a {info.kind}, the journal says {backing.value}")
        if info.size != rec.size:
            problems.append(f"its fd has {info.size} bytes, the journal says {rec.size}")
        if info.page_size != rec.page_size:
            problems.append(f"page size {info.page_size}, the journal says {rec.page_size}")
        if not info.writable:
            problems.append("its fd is not read-write")
        if rec.seals >= 0 and info.seals != rec.seals:
            problems.append(f"seals {info.seals}, the journal says {rec.seals}")
        if problems:
            raise BadRequest("; ".join(problems))
        regions = [Region(*r) for r in rec.regions]
        check_regions(regions, rec.size, rec.page_size)
        space = Space(
            name=rec.name,
            fd=fd,
            size=rec.size,
            backing=backing,
            page_size=rec.page_size,
            owner=rec.owner,
            owner_uid=rec.owner_uid,
            ephemeral=False,
            imported=rec.imported,
            regions=regions,
            dev=rec.dev,
            ino=rec.ino,
            space_id=rec.space_id,
        )
        space.created_unix = rec.created_unix
        return space

    def close_journal(self) -> None:
        if self.journal is not None:
            if self._reports_flush is not None:
                self._reports_flush.cancel()
            self._flush_reports()
            self.journal.close()
            self.journal = None

    # -- the per-space queue ------------------------------------------------------------------

    def queue(self, space: Space) -> SpaceQueue:
        q = self.queues.get(space.space_id)
        if q is None:
            q = self.queues[space.space_id] = SpaceQueue(self.loop, space.space_id)
        return q

    async def change(self, space: Space, name: str, job: Callable[[], Awaitable[T]]) -> T:
        """Runs `job` as the space's next change and waits for it. If the caller is cancelled
        (a deadline, a dropped call) the job still runs to its end; a report it produces is
        marked `caller_gone`, logged, counted and kept for ListRevocations."""

        async def guarded() -> T:
            if space.deleting or self.spaces.get(space.space_id) is not space:
                raise UnknownObject(f"no space {space.space_id!r} (deleted meanwhile)")
            return await job()

        future = self.queue(space).submit(name, guarded)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(self._orphaned, space))
            raise

    def _orphaned(self, space: Space, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if isinstance(result, RevocationResult):
            result.caller_gone = True
            self._journal_report(space, result, update=True)  # the row written without it
            log.warning(
                "revocation seq %d of %s finished after its caller left: %s",
                result.seq,
                result.space_id,
                ", ".join(f"{c.client} {c.outcome.value}" for c in result.clients) or "no client",
            )

    def revocations(
        self, session: Session, space_id: str, after_seq: int
    ) -> list[RevocationResult]:
        space = self.spaces.get(space_id)
        if space is None:
            raise UnknownObject(f"no space {space_id!r}")
        self.owned_space(session, space_id)
        return [r for r in self.queue(space).history if r.seq > after_seq]

    # -- space lifecycle ------------------------------------------------------------------------

    def _check_space_quota(self, session: Session, size: int) -> None:
        """Policy (may this identity own spaces?) and quotas, before anything is allocated."""
        policy.check_owner(self.config, session.identity)
        every = [*self.spaces.values(), *self._creating.values()]
        if len(every) >= self.config.max_spaces:
            raise LimitReached("max_spaces", self.config.max_spaces, "too many spaces")
        owned = [s for s in every if s.owner == session.name]
        policy.check_owner_quota(
            self.config, session.name, len(owned), sum(s.size for s in owned), size
        )

    async def create_space(
        self,
        session: Session,
        *,
        size: int,
        backing: BackingKind,
        name: str,
        ephemeral: bool,
        regions: list[Region],
        huge_page_size: int,
    ) -> tuple[Space, int]:
        page = (
            huge_page_size if backing is BackingKind.MEMFD_HUGETLB else os.sysconf("SC_PAGE_SIZE")
        )
        check_size(size, page or 1, self.config.max_space_bytes)
        check_regions(regions, size, page or 1)
        self._check_space_quota(session, size)
        if backing is BackingKind.GUEST_MEMFD and self._gmem is None:
            self._gmem = sys_kvm.GuestMemfdFactory()
        fd, page_size = create_backing(backing, name or "space", size, huge_page_size, self._gmem)
        try:
            st = os.fstat(fd)
            space = Space(
                name=name,
                fd=fd,
                size=size,
                backing=backing,
                page_size=page_size,
                owner=session.name,
                owner_uid=session.uid,
                ephemeral=ephemeral,
                imported=False,
                regions=regions,
                dev=st.st_dev,
                ino=st.st_ino,
            )
        except BaseException:
            os.close(fd)
            raise
        await self._add_space(space)
        tag = session.deliver_fd(space.fd, space.space_id)
        log.info(
            "space %s created by %r: %s, %d bytes",
            space.space_id,
            session.name,
            backing.value,
            size,
        )
        return space, tag

    async def import_space(
        self,
        session: Session,
        *,
        tag: int,
        name: str,
        ephemeral: bool,
        regions: list[Region],
        expected_size: int,
    ) -> Space:
        policy.check_owner(self.config, session.identity)
        fd = session.offered.get(tag)
        if fd is None:
            raise BadRequest(
                f"no fd offered with tag {tag} on this session (send an fd_offer "
                "frame before ImportSpace)"
            )
        found = inspect_import(fd)
        if expected_size and expected_size != found.size:
            raise BadRequest(f"imported fd has {found.size} bytes, expected {expected_size}")
        self._check_space_quota(session, found.size)
        check_size(found.size, found.page_size, self.config.max_space_bytes)
        check_regions(regions, found.size, found.page_size)
        # Everything is checked: only now is the owner's memfd changed (sealed) and adopted.
        if found.needs_seals:
            seal_import(fd, found.size)
        del session.offered[tag]
        space = Space(
            name=name,
            fd=fd,
            size=found.size,
            backing=found.kind,
            page_size=found.page_size,
            owner=session.name,
            owner_uid=session.uid,
            ephemeral=ephemeral,
            imported=True,
            regions=regions,
            dev=found.dev,
            ino=found.ino,
        )
        await self._add_space(space)
        log.info(
            "space %s imported by %r: %s, %d bytes",
            space.space_id,
            session.name,
            found.kind.value,
            found.size,
        )
        return space

    async def delete_space(
        self, session: Session, space_id: str, on_pinned: str | None = None
    ) -> RevocationResult:
        space = self.owned_space(session, space_id)
        return await self.change(
            space, "delete", lambda: self._delete_job(space, "deleted", on_pinned)
        )

    async def _delete_job(self, space: Space, why: str, on_pinned: str | None) -> RevocationResult:
        """Revokes everything from every attached session, then frees the space."""
        t0 = time.perf_counter()
        fenced = await self._clear_pins(space, 0, space.size, None, on_pinned)
        space.deleting = True
        seq = space.table.retire()
        whole = (AccessRange(0, space.size, Access.NONE),)
        batch = Batch(self.loop)
        frames = await self._encoder(space.space_id, seq).revoke(whole, True)
        for session_id in list(space.attachments):
            session = self._by_id.get(session_id)
            if session is not None:
                self._expect_ack(batch, space, session, seq, whole)
                self._send_all(session, frames)
        result = await self._settle(space, seq, batch, "delete", t0, space.size, fenced)
        for session_id in list(space.attachments):
            session = self._by_id.get(session_id)
            if session is not None:
                self._detach(space, session)
        self.spaces.pop(space.space_id, None)
        queue = self.queues.pop(space.space_id, None)
        if queue is not None:
            queue.closed = True
        await self._journal_gone(space)
        space.close()
        log.info("space %s deleted (%s)", space.space_id, why)
        return result

    # -- access --------------------------------------------------------------------------------

    async def set_attributes(
        self,
        session: Session,
        space_id: str,
        spans: Sequence[tuple[int, int]],
        shared: bool,
        on_pinned: str | None = None,
    ) -> RevocationResult:
        """Makes byte ranges `spans` ((offset, length), sorted, disjoint) shared or private,
        as one change."""
        space = self.owned_space(session, space_id)
        spans = space.table.check_spans(spans)  # validated up front: a bad range changes nothing

        async def job() -> RevocationResult:
            t0 = time.perf_counter()
            if shared:
                with collector_paused():
                    delta = space.table.set_shared_many(spans)
                written = self._journal_change(space, SHARED, SHARE, spans)
                result = await self.carry_out(space, delta, "shared", t0)
                return _saved(result, await self._journal_wait(space, written))
            fenced = await self._clear_pins_of(space, spans, None, on_pinned)
            with collector_paused():
                delta = space.table.set_private_many(spans)
            written = self._journal_change(space, SHARED, PRIVATE, spans)
            result = await self.carry_out(space, delta, "private", t0, fenced)
            return _saved(result, await self._journal_wait(space, written))

        return await self.change(space, "shared" if shared else "private", job)

    async def grant(
        self,
        session: Session,
        space_id: str,
        client: str,
        spans: Sequence[tuple[int, int]],
        access: Access,
        on_pinned: str | None = None,
    ) -> tuple[int, int]:
        space = self.owned_space(session, space_id)
        if not CLIENT_NAME.match(client):
            raise BadRequest(f"client name {client!r} is not a valid client name")
        spans = space.table.check_spans(spans)

        async def job() -> tuple[int, int]:
            # Refused at once when not even one more range fits; a batch is counted exactly
            # by the table (and undone if it goes over).
            policy.check_grant_quota(self.config, client, space.table.fragment_count(client))
            t0 = time.perf_counter()
            fenced: list[ClientResult] = []
            if access is Access.RO:
                shared = [(o, n) for o, n in spans if space.table.is_shared(o, n)]
                if shared:
                    fenced = await self._clear_pins_of(
                        space, shared, client, on_pinned, write_only=True
                    )
            limit = self.config.max_grant_fragments_per_client
            try:
                delta = await self._grant_in_table(space, client, spans, access, limit)
            except TooFragmented as exc:
                raise LimitReached(
                    "max_grant_fragments_per_client",
                    limit,
                    f"client {client!r} would hold {exc.count} grant ranges in this space",
                ) from None
            self.metrics.grants.inc()
            kind = GRANT_RW if access is Access.RW else GRANT_RO
            written = self._journal_change(space, client, kind, spans)
            notified = self._attached(space, client) is not None
            await self.carry_out(space, delta, "downgrade", t0, fenced)
            return _saved((delta.seq, int(notified)), await self._journal_wait(space, written))

        return await self.change(space, "grant", job)

    async def _grant_in_table(
        self,
        space: Space,
        client: str,
        spans: Sequence[tuple[int, int]],
        access: Access,
        limit: int,
    ) -> Delta:
        """`grant_many` on the space's table. A large batch (thousands of ranges into a client
        that may hold a million) is computed on a worker from the current state, which the
        loop keeps serving meanwhile, and committed here; if the table changed in between (a
        fence outside the queue), it is computed again, on the loop."""
        table = space.table
        with collector_paused():
            # Large either way: many ranges, or more than a few into a client holding so many
            # that the batch is merged over its whole sets (milliseconds). A few ranges into
            # any client cost a few tens of microseconds (its sets are copied on write, chunk by
            # chunk): done here, without a thread hop.
            if len(spans) >= OFFLOAD_RANGES or (
                len(spans) > FEW_RANGES and table.fragment_count(client) >= OFFLOAD_FRAGMENTS
            ):
                prepared = await asyncio.to_thread(
                    without_collector(table.prepare_grant), client, spans, access, limit
                )
                try:
                    return table.commit_grant(prepared)
                except StaleChange:
                    pass
            return table.grant_many(client, spans, access, max_fragments=limit)

    async def revoke(
        self,
        session: Session,
        space_id: str,
        client: str,
        spans: Sequence[tuple[int, int]],
        on_pinned: str | None = None,
    ) -> RevocationResult:
        space = self.owned_space(session, space_id)
        spans = space.table.check_spans(spans)

        async def job() -> RevocationResult:
            t0 = time.perf_counter()
            fenced = await self._clear_pins_of(space, spans, client, on_pinned)
            with collector_paused():
                delta = space.table.revoke_many(client, spans)
            written = self._journal_change(space, client, REVOKE, spans)
            result = await self.carry_out(space, delta, "revoke", t0, fenced)
            return _saved(result, await self._journal_wait(space, written))

        return await self.change(space, "revoke", job)

    async def _clear_pins_of(
        self,
        space: Space,
        spans: Sequence[tuple[int, int]],
        client: str | None,
        on_pinned: str | None,
        write_only: bool = False,
    ) -> list[ClientResult]:
        """`_clear_pins` for each range of a batch that has pins (none: no cost per range)."""
        fenced: list[ClientResult] = []
        pins = [p for p in space.table.pins() if client is None or p.client == client]
        if not pins:
            return fenced
        # Only the ranges that touch a pin, found through sets when there are many of both
        # (thousands of pins against a batch of thousands of ranges: seconds on the loop pair
        # by pair).
        in_the_way = touching(pins, pin_span, [(o, o + n) for o, n in spans])
        spans = touching(spans, lambda s: (s[0], s[0] + s[1]), [pin_span(p) for p in in_the_way])
        for offset, length in spans:
            if space.table.pins_overlapping(offset, length, client):
                fenced += await self._clear_pins(
                    space, offset, length, client, on_pinned, write_only
                )
        return fenced

    async def _clear_pins(
        self,
        space: Space,
        offset: int,
        length: int,
        client: str | None,
        on_pinned: str | None,
        write_only: bool = False,
    ) -> list[ClientResult]:
        """Before access is lowered: waits, up to the deadline, for the pins in the range to
        go (no new pin may start there meanwhile); then fails (RangePinned, nothing changed)
        or fences the pinning clients, per `on_pinned` (None: the configured default).
        Returns the fenced clients' results for the report."""

        def pinned() -> list[Pin]:
            pins = space.table.pins_overlapping(offset, length, client)
            return [p for p in pins if p.write] if write_only else pins

        pins = pinned()
        if not pins:
            return []
        deadline_ms = self.config.revoke_deadline_ms
        deadline = self.loop.time() + deadline_ms / 1000
        # Tell each pinning client which of its pins are in the way: a VMM deletes its
        # memslot and unpins, a DMA engine finishes and unpins.
        for holder_id in dict.fromkeys(p.holder for p in pins):
            holder = self._by_id.get(holder_id)
            if holder is None:
                continue
            ranges = []
            for p in pins:
                if p.holder == holder_id:
                    lo, hi = max(p.offset, offset), min(p.offset + p.length, offset + length)
                    ranges.append(spb.Range(offset=lo, length=hi - lo))
            holder.conn.send(
                spb.Frame(
                    release_pins=spb.ReleasePins(
                        space_id=space.space_id, ranges=ranges, deadline_ms=deadline_ms
                    )
                )
            )
        blocked = (offset, offset + length)
        space.blocked.append(blocked)
        t_wait = time.perf_counter()
        try:
            while pins and (left := deadline - self.loop.time()) > 0:
                space.unpinned.clear()
                try:
                    await asyncio.wait_for(space.unpinned.wait(), left)
                except TimeoutError:
                    pass
                pins = pinned()
        finally:
            space.blocked.remove(blocked)
        if not pins:
            return []
        if (on_pinned or self.config.on_pinned) == "fail":
            first = min(pins, key=lambda p: max(p.offset, offset))
            holder = self._by_id.get(first.holder)
            raise RangePinned(
                first.client,
                first.holder,
                holder.pid if holder else 0,
                max(first.offset, offset),
                first.pin_id,
                deadline_ms,
            )
        holders = []
        for holder_id in dict.fromkeys(p.holder for p in pins):
            holder = self._by_id.get(holder_id)
            if holder is None:
                continue
            first = next(p for p in pins if p.holder == holder_id)
            reason = (
                f"offset {max(first.offset, offset):#x} still pinned (pin {first.pin_id}) "
                f"after {deadline_ms} ms"
            )
            holders.append((holder, reason))
        fenced = await asyncio.gather(
            *(self.enforcer.fence(holder, "pinned", reason) for holder, reason in holders)
        )
        return [
            ClientResult(
                holder.name,
                holder.session_id,
                holder.pid,
                Outcome.FENCED,
                time.perf_counter() - t_wait,
                outcome.reason,
                outcome.result,
            )
            for (holder, _), outcome in zip(holders, fenced, strict=True)
        ]

    def _attached(self, space: Space, client: str) -> Session | None:
        session = self._by_name.get(client)
        if session is not None and space.space_id in session.attached:
            return session
        return None

    # -- pushing -------------------------------------------------------------------------------

    def _encoder(self, space_id: str, seq: int) -> Encoder:
        return Encoder(self.loop, space_id, seq, self.config.max_frame_bytes, self.deadline_ms)

    def deadline_ms(self, ranges: int) -> int:
        """How long a client has to tear down a revocation of `ranges` ranges."""
        return self.config.revoke_deadline_ms + int(
            ranges * self.config.revoke_deadline_us_per_range / 1000
        )

    def _send_all(self, session: Session, frames: list[bytes]) -> None:
        for data in frames:
            session.conn.send_encoded(data)

    async def carry_out(
        self,
        space: Space,
        delta: Delta,
        cause: str,
        t0: float,
        fenced: list[ClientResult] | None = None,
    ) -> RevocationResult:
        """Pushes a delta to the attached sessions; waits for the acks of what was lowered.

        Clients that get the same ranges (a conversion to private seen by every grantee) get
        the same bytes: each distinct frame is encoded once per fan-out. A large change is
        encoded off the event loop, so other sessions are not kept waiting meanwhile.
        """
        batch = Batch(self.loop)
        encoder = self._encoder(space.space_id, delta.seq)
        revoked = 0
        enforced: list[ClientResult] = []
        # Sealed clients whose write access goes with a revocation they acknowledge: their
        # write-protection follows every push (below).
        protect_after: list[tuple[SealedMapping, Sequence[AccessRange]]] = []
        try:
            for change in delta.clients:
                session = self._attached(space, change.client)
                if len(change.lowered) >= OFFLOAD_RANGES:
                    # Summing a million runs holds the GIL ~20 ms: not on the loop.
                    revoked += await asyncio.to_thread(_lowered_bytes, change)
                else:
                    revoked += change.lowered_bytes
                if session is None:
                    continue
                sealed = session.sealed.get(space.space_id)
                if sealed is not None:
                    # Write access taken away is write-protected in the client by the broker;
                    # read access goes when it acknowledges (see _ack). Where it must
                    # acknowledge, the write-protection follows the pushes, in this same turn
                    # of the loop (before any acknowledgement is taken): each client starts
                    # tearing down ~70 us sooner (the last of 32, ~2 ms sooner), and nothing
                    # is reported done before both. Else (only write access lowered: enforced
                    # here) it comes before anything is pushed. A large change is applied on a
                    # worker thread, before anything is pushed (faults wait for it, the loop
                    # does not).
                    update = functools.partial(
                        _sealed_update, sealed, change.lowered, change.raised
                    )
                    if len(change.lowered) + len(change.raised) >= OFFLOAD_RANGES:
                        await self.loop.run_in_executor(None, without_collector(update))
                    elif change.lowered and not all(r.access is Access.RO for r in change.lowered):
                        sealed.set_access(change.raised)
                        protect_after.append((sealed, change.lowered))
                    else:
                        update()
                if change.raised:
                    if space.space_id in session.read_only_fd and any(
                        r.access is Access.RW for r in change.raised
                    ):
                        # Its first rw grant: a read-write description, before the update says
                        # so.
                        session.read_only_fd.discard(space.space_id)
                        session.deliver_fd(space.fd, space.space_id, upgrade=True)
                    self._send_all(session, await encoder.update(change.raised))
                if (
                    sealed is not None
                    and change.lowered
                    and all(r.access is Access.RO for r in change.lowered)
                ):
                    # Only write access was taken: done by the broker alone, checked in the
                    # kernel's view; the client is told, with nothing to acknowledge.
                    enforced.append(await self._enforced(space, session, change.lowered, t0))
                    self._send_all(session, await encoder.update(change.lowered))
                    continue
                if change.lowered:
                    frames = await encoder.revoke(change.lowered, False)
                    self._expect_ack(batch, space, session, delta.seq, change.lowered)
                    if session.conn.closed or space.space_id not in session.attached:
                        # Gone while the frames were being encoded: judged like any session
                        # that ends during a revocation (the kernel says whether it still maps
                        # them).
                        ack = session.pending_acks.pop((space.space_id, delta.seq))
                        ack.settle(Verdict.LOST, "session ended before the revocation reached it")
                        continue
                    self._send_all(session, frames)
        finally:
            for sealed, lowered in protect_after:
                sealed.lower_write(lowered)
        if not revoked and not fenced:
            return RevocationResult(
                space.space_id, delta.seq, (), time.perf_counter() - t0, 0, cause
            )
        return await self._settle(
            space, delta.seq, batch, cause, t0, revoked, list(fenced or ()) + enforced
        )

    async def _enforced(
        self, space: Space, session: Session, ranges: Sequence[AccessRange], t0: float
    ) -> ClientResult:
        """The outcome of a write revoke the broker carried out itself on a sealed client."""
        verdict, why = await self.judge(session, space.space_id, ranges)
        latency = time.perf_counter() - t0
        if verdict is Verdict.ACKED:
            return ClientResult(
                session.name, session.session_id, session.pid, Outcome.ENFORCED, latency
            )
        if verdict is Verdict.UNVERIFIED and self.config.on_unverifiable == "report":
            self.unverified_total += 1
            return ClientResult(
                session.name, session.session_id, session.pid, Outcome.UNVERIFIED, latency, why
            )
        outcome = await self.enforcer.fence(
            session, "verify", f"write-protected by the broker, but {why}"
        )
        return ClientResult(
            session.name,
            session.session_id,
            session.pid,
            Outcome.FENCED,
            latency,
            outcome.reason,
            outcome.result,
        )

    def _expect_ack(
        self,
        batch: Batch,
        space: Space,
        session: Session,
        seq: int,
        ranges: Sequence[AccessRange],
    ) -> None:
        session.retain()  # judged and perhaps fenced after its connection is gone
        ack = batch.expect(session, space.space_id, seq, ranges)
        ack.deadline_ms = self.deadline_ms(len(ranges))
        session.pending_acks[(space.space_id, seq)] = ack

    # -- settling ------------------------------------------------------------------------------

    async def _settle(
        self,
        space: Space,
        seq: int,
        batch: Batch,
        cause: str,
        t0: float,
        revoked: int,
        fenced: list[ClientResult] | None = None,
    ) -> RevocationResult:
        """Waits for the batch, then turns every verdict into an outcome: acknowledged and
        verified, or fenced (with what fencing achieved), or gone, or unverified (by policy)."""
        await batch.wait(max((a.deadline_ms for a in batch.acks), default=0) / 1000)
        # Acknowledged in time but still being verified off the loop (a large revocation):
        # the verdict decides, not the clock.
        waited = 0.0
        while any(a.acked_at is not None and not a.settled for a in batch.acks) and waited < 60:
            await asyncio.sleep(0.005)
            waited += 0.005
        try:
            results = list(fenced or ())
            # Acknowledged and verified: concluded here; only the rest (fences, judgements
            # again) are awaited, each as a task (a task per ack costs loop turns).
            concluded = [self._concluded(space, ack) for ack in batch.acks]
            rest = [ack for ack, done in zip(batch.acks, concluded, strict=True) if done is None]
            if rest:
                later = iter(await asyncio.gather(*(self._conclude(space, ack) for ack in rest)))
                concluded = [done if done is not None else next(later) for done in concluded]
            results += cast(list[ClientResult], concluded)
        finally:
            for ack in batch.acks:
                ack.session.pending_acks.pop((space.space_id, seq), None)
                ack.session.release()
        duration = time.perf_counter() - t0
        self.revocations_total += 1
        self.metrics.revoked(cause, duration, [r.outcome.value for r in results])
        result = RevocationResult(space.space_id, seq, tuple(results), duration, revoked, cause)
        self.queue(space).history.append(result)
        self._journal_report(space, result)
        return result

    def _journal_report(
        self, space: Space, result: RevocationResult, *, update: bool = False
    ) -> None:
        """The report goes to the journal too, so that ListRevocations answers with it after
        a restart (the newest HISTORY of each space are kept, as in memory). Not on the
        revocation's path: reports are gathered and written together, one transaction at
        most every REPORTS_FLUSH_S (and at the journal's close), so a crash may lose the
        last few; a report's caller_gone mark, set after it was gathered, goes with it."""
        if self.journal is None or space.ephemeral:
            return
        self._unjournaled.append((space.space_id, result, update))
        if self._reports_flush is None:
            self._reports_flush = self.loop.call_later(REPORTS_FLUSH_S, self._flush_reports)

    def _flush_reports(self) -> None:
        self._reports_flush = None
        pending, self._unjournaled = self._unjournaled, []
        if not pending or self.journal is None:
            return
        journal = self.journal.journal

        def write() -> None:
            # Encoded on the journal's thread: the loop serves clients meanwhile.
            journal.add_revocations(
                [(i, r.seq, r.cause, report_to_json(r), u) for i, r, u in pending], HISTORY
            )

        self.journal.submit(write)

    def _concluded(self, space: Space, ack: Ack) -> ClientResult | None:
        """The outcome of an acknowledgement verified in time (its pins released); None for
        any other verdict (`_conclude`)."""
        if ack.verdict is not Verdict.ACKED:
            return None
        session = ack.session
        released = (
            space.table.release_pins(session.session_id, [(r.offset, r.length) for r in ack.ranges])
            if space.table.pins(session.session_id)
            else []
        )
        if released:
            space.unpinned.set()
            log.info("released %d pin(s) of %r on acknowledged revoke", len(released), session.name)
        return self._result(ack, Outcome.ACKED)

    async def _conclude(self, space: Space, ack: Ack) -> ClientResult:
        done = self._concluded(space, ack)
        if done is not None:
            return done
        session = ack.session
        seq = ack.seq
        verdict, why = ack.verdict, ack.reason
        if verdict is Verdict.PENDING:
            # Not settled by the deadline: it is settled now, so a late ack is a protocol error.
            session.pending_acks.pop((space.space_id, seq), None)
            ack.settle(Verdict.PENDING)
            return await self._fenced(
                ack,
                "no_ack",
                f"no acknowledgement of seq {seq} within {ack.deadline_ms} ms",
            )
        if verdict is Verdict.CAUGHT:
            return await self._fenced(ack, "verify", f"acknowledged seq {seq} but {why}")
        if verdict is Verdict.REFUSED:
            return await self._fenced(ack, "refused", f"refused to tear down seq {seq}: {why}")
        if verdict is Verdict.UNVERIFIED:
            if self.config.on_unverifiable == "fence":
                return await self._fenced(
                    ack, "unverifiable", f"acknowledged seq {seq} but {why} (on_unverifiable)"
                )
            self.unverified_total += 1
            return self._result(ack, Outcome.UNVERIFIED, f"acknowledged seq {seq} but {why}")
        # LOST: the session ended or detached first. Gone only if the kernel agrees.
        if not is_alive(session):
            return self._result(ack, Outcome.GONE, f"{why}; the process has exited")
        again, problem = await self.judge(session, space.space_id, ack.ranges)
        if again is Verdict.CAUGHT:
            return await self._fenced(ack, "lost", f"{why} without acknowledging, and {problem}")
        if again is Verdict.UNVERIFIED and self.config.on_unverifiable == "fence":
            return await self._fenced(
                ack, "unverifiable", f"{why} without acknowledging, and {problem}"
            )
        return self._result(ack, Outcome.GONE, why)

    async def _fenced(self, ack: Ack, kind: str, reason: str) -> ClientResult:
        outcome = await self.enforcer.fence(ack.session, kind, reason)
        return self._result(ack, Outcome.FENCED, outcome.reason, outcome.result)

    @staticmethod
    def _result(
        ack: Ack, outcome: Outcome, reason: str = "", fence: FenceResult | None = None
    ) -> ClientResult:
        s = ack.session
        return ClientResult(
            s.name,
            s.session_id,
            s.pid,
            outcome,
            ack.latency,
            reason,
            fence,
            ack.withdrawn,
            ack.in_flight,
            s.isolation.get(ack.space_id, ""),
        )

    # -- audits --------------------------------------------------------------------------------

    async def audit_forever(self) -> None:
        """Every audit_interval_s, audits every space with attached clients."""
        while True:
            await asyncio.sleep(self.config.audit_interval_s)
            await self.audit()

    async def audit(self) -> list[tuple[str, str]]:
        """One full audit, each space as a job of its queue (in order with its changes, so a
        revocation in flight is never mistaken for a violation, nor skipped for ever).
        Fences whoever maps what it does not hold; returns the fenced."""
        t0 = time.perf_counter()
        fenced: list[tuple[str, str]] = []
        for space in list(self.spaces.values()):
            if not space.attachments or space.deleting:
                continue
            space_id = space.space_id

            async def job(space_id: str = space_id) -> list[tuple[str, str]]:
                return await self.enforcer.audit_space(space_id)

            try:
                fenced += await self.change(space, "audit", job)
            except UnknownObject:
                continue
        self.metrics.audits.inc()
        self.metrics.audit_seconds.observe(time.perf_counter() - t0)
        return fenced

    # -- clients -------------------------------------------------------------------------------

    async def attach(
        self, session: Session, space_id: str, kind: Attachment, *, sealed: bool = False
    ) -> Attached:
        """Delivers the fd: O_RDWR only to a client that holds a read-write grant (or the
        owner), else an O_RDONLY description.

        Runs as a job of the space's queue, so the access it reports is exactly the access at
        its seq (no change is half done); a large snapshot is built off the event loop."""
        looking = session.letting_go.get(space_id)
        if looking is not None:
            # The look after its last detach of this space comes first: it must not see the
            # fd this attach hands out.
            await asyncio.wait([looking])
        space = self.space(space_id)
        policy.check_attach(self.config, session.identity)
        if kind is Attachment.VA and not sealed and self.config.va_mode == "sealed":
            raise NotAllowed(
                "this broker requires sealed VA mode (va_mode = sealed): attach with a sealed "
                "mapping, on a kernel with mseal and userfaultfd minor faults"
            )
        self._check_attach(session, space)
        if kind is Attachment.VA and (sealed or self.config.va_mode == "sealed"):
            why_not = space.sealed_unsupported() or self._holds_fd_by_right(session, space)
            if why_not and self.config.va_mode == "sealed":
                raise NotAllowed(
                    f"this broker requires sealed VA mode, which {space.space_id} "
                    f"({space.backing.value}) cannot offer: {why_not}"
                )
            if why_not:
                log.info(
                    "session %s (%r): %s attached cooperatively: sealed mode unavailable (%s)",
                    session.session_id,
                    session.name,
                    space.space_id,
                    why_not,
                )
                sealed = False

        async def job() -> Attached:
            self._check_attach(session, space)
            readable, writable = space.table.allowed_sets(session.name)
            seq = space.table.seq
            ranges: Sequence[AccessRange] = ()
            frames: list[bytes] = []
            if len(readable) + len(writable) < OFFLOAD_RANGES:
                ranges = space.table.ranges_of(readable, writable)
                if len(ranges) > ATTACH_INLINE_RANGES:
                    frames = self._encoder(space_id, seq).snapshot_frames(ranges)
            else:
                # Built and encoded together on a worker: a million range objects are made and
                # freed there, never alive on the loop where the collector would walk them.
                encoder = self._encoder(space_id, seq)
                table = space.table

                def snapshot() -> list[bytes]:
                    return encoder.snapshot_frames(table.ranges_of(readable, writable))

                frames = await self.loop.run_in_executor(None, without_collector(snapshot))
            on_session = bool(frames)
            if on_session:
                self._check_attach(session, space)  # still there after the encoding?
                self._send_all(session, frames)
            rw_fd = self.is_owner(session, space) or space.table.has_rw_grant(session.name)
            if sealed:
                # userfaultfd registers only mappings that could be made writable (an O_RDWR
                # description): a client without a rw grant maps read-only, which the broker
                # checks and the seal keeps so; it holds the fd only until it has sealed.
                fd = space.fd
            else:
                fd = space.fd if rw_fd else space.read_only_fd()
                if fd < 0:
                    fd, rw_fd = space.fd, True  # no read-only description of this backing
            session.attached[space_id] = kind
            session.attached_at[space_id] = time.monotonic()
            space.attachments[session.session_id] = kind
            if sealed:
                session.sealing[space_id] = rw_fd
                # The description it gets is read-write (userfaultfd needs one) whatever it
                # was granted: it must seal, and so give it up, before long. A large snapshot
                # takes the client longer to apply first: the same allowance per range as a
                # revocation's teardown.
                held = len(readable) + len(writable)
                allowed_ms = self.config.seal_timeout_ms + int(
                    held * self.config.revoke_deadline_us_per_range / 1000
                )
                self.loop.call_later(
                    allowed_ms / 1000,
                    self._seal_overdue,
                    session,
                    space_id,
                    session.attached_at[space_id],
                )
            elif not rw_fd:
                # An fd client, or a cooperative VA one: upgraded on its first rw grant.
                session.read_only_fd.add(space_id)
            tag = session.deliver_fd(fd, space.space_id)
            return Attached(
                space, tag, seq, [] if on_session else ranges, on_session, rw_fd, sealed
            )

        return await self.change(space, "attach", job)

    async def resume_attach(
        self,
        session: Session,
        space_id: str,
        kind: Attachment,
        *,
        sealed: bool,
        address: int,
        writable: bool,
    ) -> Attached:
        """Re-binds an attachment a resumed session held before the restart (no fd: it still
        has its mapping or its fd), and re-synchronises it (`_resync`): pushes its effective
        access now and a Revoke of everything beyond it, waits for the acknowledgement and
        verifies the process like any revocation (the report, cause "resume", is in the
        space's history). A client still mapping more than it holds is fenced.

        A sealed mapping lost its userfaultfd with the previous daemon: it is re-bound as
        sealed mode is entered (`sealing`), the client sends a new userfaultfd (`Sealed`), the
        mapping is checked and registered like a new one, and only then re-synchronised."""
        space = self.space(space_id)
        if not session.resumed:
            raise WrongState(
                "only a resumed session re-binds an attachment (AttachRequest.resume): attach "
                "without resume"
            )
        policy.check_attach(self.config, session.identity)
        if kind is Attachment.VA and not sealed and self.config.va_mode == "sealed":
            raise NotAllowed(
                "this broker requires sealed VA mode (va_mode = sealed): a cooperative "
                "mapping cannot be resumed; attach again with a sealed one"
            )
        if sealed and space.sealed_unsupported():
            raise WrongState(f"{space_id} cannot offer sealed mode: {space.sealed_unsupported()}")
        if kind is Attachment.VA and (address == 0 or address % space.page_size):
            raise BadRequest(f"address {address:#x} is not a page-aligned mapping address")

        async def job() -> Attached:
            self._check_attach(session, space)
            seq = space.table.seq
            owner = self.is_owner(session, space)
            session.attached[space_id] = kind
            session.attached_at[space_id] = time.monotonic()
            space.attachments[session.session_id] = kind
            if sealed:
                may_write = owner or space.table.has_rw_grant(session.name)
                session.sealing[space_id] = may_write
                session.resyncing.add(space_id)
                return Attached(space, 0, seq, [], False, may_write, True)
            if kind is Attachment.VA:
                session.va_base[space_id] = address
            writable_now = True
            if not writable:
                if owner or space.table.has_rw_grant(session.name):
                    # Granted rw while it was away: a read-write description first.
                    session.deliver_fd(space.fd, space.space_id, upgrade=True)
                else:
                    session.read_only_fd.add(space_id)
                    writable_now = False
            held = await self._resync(session, space)
            log.info(
                "session %s (%r): attachment to %s resumed at seq %d (%d held range(s))",
                session.session_id,
                session.name,
                space_id,
                seq,
                held,
            )
            return Attached(space, 0, seq, [], False, writable_now, False)

        return await self.change(space, "attach", job)

    async def _resync(self, session: Session, space: Space) -> int:
        """(In the space's queue.) Pushes what a resumed client holds (AccessUpdate) and
        revokes everything else, then waits for its acknowledgement and the verification;
        WrongState if it was fenced. Returns the number of held ranges."""
        readable, writable_set = space.table.allowed_sets(session.name)
        seq = space.table.seq
        table, size = space.table, space.size

        def plan() -> tuple[list[AccessRange], list[AccessRange]]:
            held = list(table.ranges_of(readable, writable_set))
            return held, _beyond(held, size)

        if len(readable) + len(writable_set) < OFFLOAD_RANGES:
            held, beyond = plan()
        else:
            # Built on a worker (a million range objects): see attach.
            held, beyond = await self.loop.run_in_executor(None, without_collector(plan))
        if session.conn.closed or space.space_id not in session.attached:
            raise WrongState(f"the session of {session.name!r} ended or detached meanwhile")
        t0 = time.perf_counter()
        encoder = self._encoder(space.space_id, seq)
        if held:
            self._send_all(session, await encoder.update(held))
        if beyond:
            batch = Batch(self.loop)
            frames = await encoder.revoke(beyond, False)
            self._expect_ack(batch, space, session, seq, beyond)
            self._send_all(session, frames)
            result = await self._settle(space, seq, batch, "resume", t0, 0)
            for outcome in result.clients:
                if outcome.outcome is Outcome.FENCED:
                    raise WrongState(
                        f"{space.space_id} could not be re-synchronised: {outcome.reason}"
                    )
        return len(held)

    async def _resync_sealed(self, session: Session, space: Space) -> None:
        """A resumed sealed mapping was accepted: now re-synchronise it (see resume_attach)."""
        try:
            held = await self.change(space, "resume", lambda: self._resync(session, space))
        except (WrongState, UnknownObject) as exc:
            log.warning("session %s: resuming %s: %s", session.session_id, space.space_id, exc)
            return
        log.info(
            "session %s (%r): sealed attachment to %s resumed (%d held range(s))",
            session.session_id,
            session.name,
            space.space_id,
            held,
        )

    def _holds_fd_by_right(self, session: Session, space: Space) -> str:
        """Why the process of `session` may keep an fd of `space` (then a sealed mapping in it
        proves nothing), or ''."""
        allowance = self.allowance(session, space, [])
        if allowance is None:
            return "its process is the space's owner, which holds the fd"
        if allowance[1]:
            return "its process holds the space's fd as an fd client"
        return ""

    def _check_attach(self, session: Session, space: Space) -> None:
        if session.conn.closed:
            raise WrongState(f"the session of {session.name!r} has ended")
        if space.space_id in session.attached:
            raise WrongState(f"client {session.name!r} is already attached to {space.space_id}")
        if (
            not self.config.attach_without_grant
            and not space.table.has_grants(session.name)
            and not self.is_owner(session, space)
        ):
            raise WrongState(
                f"client {session.name!r} holds no grant on {space.space_id}: the owner grants "
                "first, then the client attaches (attach_without_grant = false)"
            )

    def detach(self, session: Session, space_id: str) -> int:
        space = self.space(space_id)
        if space_id not in session.attached:
            raise WrongState(f"client {session.name!r} is not attached to {space_id}")
        # The client lets go before it detaches: it unmaps, or zaps a sealed mapping (which
        # cannot be unmapped: it stays, retired, and must keep no page present).
        released = self._detach(space, session)
        self._check_let_go(session, space)
        return released

    def _check_let_go(self, session: Session, space: Space) -> None:
        """After a detach, the process must reach nothing of the space beyond what its other
        sessions may (a maps and fd read on a worker, like the look after a fence): a client
        that says it let go and did not is fenced (and killed if it still maps)."""
        if session.view is None or session.conn.closed:
            return
        reach = [Reach(space.space_id, space.dev, space.ino, space.page_size)]

        async def look() -> None:
            try:
                problem = await still_reaches(self, session, reach)
            finally:
                if session.letting_go.get(space.space_id) is task:
                    del session.letting_go[space.space_id]
            if problem is None or session.fencing is not None:
                return
            reason = f"detached from {space.space_id} but still reaches it ({problem})"
            await self.enforcer.fence(session, "detach", reason, also=reach)

        task = self.loop.create_task(look())
        session.letting_go[space.space_id] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_failure)

    def _detach(self, space: Space, session: Session) -> int:
        mapping = session.sealed.pop(space.space_id, None)
        if mapping is not None:
            # The client cannot unmap a sealed mapping; it stays served, inert, until the
            # process exits.
            mapping.retire()
        session.sealing.pop(space.space_id, None)
        session.resyncing.discard(space.space_id)
        session.read_only_fd.discard(space.space_id)
        session.attached.pop(space.space_id, None)
        session.attached_at.pop(space.space_id, None)
        session.va_base.pop(space.space_id, None)
        session.isolation.pop(space.space_id, None)
        space.attachments.pop(session.session_id, None)
        for key in [k for k in session.pending_acks if k[0] == space.space_id]:
            session.pending_acks.pop(key).settle(Verdict.LOST, "detached")
        released = space.table.release_pins(session.session_id)
        if released:
            space.unpinned.set()
        return len(released)

    def pin(
        self, session: Session, space_id: str, offset: int, length: int, write: bool
    ) -> tuple[Pin, int]:
        space = self.space(space_id)
        if space_id not in session.attached:
            raise WrongState(f"client {session.name!r} must attach to {space_id} before pinning")
        if space.is_blocked(offset, length):
            raise WrongState(
                f"range {offset:#x}+{length:#x} of {space_id} is being revoked: no new pins"
            )
        limit = self.config.max_pins_per_session
        try:
            pin = space.table.pin(
                session.session_id, session.name, offset, length, write, max_pins=limit
            )
        except TooManyPins:
            raise LimitReached(
                "max_pins_per_session", limit, f"this session holds {limit} pins on {space_id}"
            ) from None
        return pin, space.table.seq

    def unpin(self, session: Session, space_id: str, pin_id: int) -> None:
        space = self.space(space_id)
        mine = {p.pin_id for p in space.table.pins(session.session_id)}
        if pin_id not in mine:
            raise UnknownObject(f"no pin {pin_id} of this session on {space_id}")
        space.table.unpin(pin_id)
        space.unpinned.set()

    # -- views ---------------------------------------------------------------------------------

    def live_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s is not None]

    def session_by_id(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def pid_of(self, session_id: str) -> int:
        found = self._by_id.get(session_id)
        return found.pid if found else 0

    def session_name_of(self, session_id: str) -> str:
        found = self._by_id.get(session_id)
        return found.name if found else ""

    def snapshot(self) -> Snapshot:
        by_backing: dict[str, int] = {}
        shared = total = fragments = pins = attachments = 0
        for space in self.spaces.values():
            by_backing[space.backing.value] = by_backing.get(space.backing.value, 0) + 1
            total += space.size
            shared += space.table.shared_bytes()
            fragments += space.table.fragment_count()
            pins += len(space.table.pins())
            attachments += len(space.attachments)
        va = [kind for s in self._by_id.values() for kind in s.attached.values()]
        sealed = sum(len(s.sealed) for s in self._by_id.values())
        stats = self.faults.stats
        return Snapshot(
            va_sealed=sealed,
            va_cooperative=sum(1 for k in va if k is Attachment.VA) - sealed,
            sealed_mappings=len(self.faults.mappings),
            faults_mapped=stats.mapped,
            faults_refused=stats.refused,
            faults_write_released=stats.write_released,
            faults_read_ahead=stats.read_ahead,
            sessions=len(self._by_token),
            spaces_by_backing=by_backing,
            bytes_shared=shared,
            bytes_private=total - shared,
            grant_fragments=fragments,
            pins=pins,
            attachments=attachments,
            open_fds=len(os.listdir("/proc/self/fd")),
            journal_errors=self.journal.error_counts() if self.journal is not None else {},
            journal_unfolded=self.journal.unfolded if self.journal is not None else 0,
        )

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self, reason: str, *, restarting: bool = False) -> None:
        """Tells every session, closes them, frees every space (this process's fds of them:
        the fd store or an upgrade keeps them). Sessions stay resumable in the journal;
        `restarting` tells them so (an upgrade)."""
        self.stopping = True
        for queue in self.queues.values():
            queue.cancel()
        self.queues.clear()
        for conn in list(self.sessions):
            conn.close(reason, spb.Frame(goodbye=spb.Goodbye(reason=reason, restarting=restarting)))
        for task in list(self._tasks):
            task.cancel()
        self.faults.close()
        for space in self.spaces.values():
            space.close()
        self.spaces.clear()
        if self._gmem is not None:
            self._gmem.close()
            self._gmem = None


@dataclasses.dataclass(slots=True)
class JournalWrite:
    """A change's write to the journal (`Broker._journal_change`): of `key`'s set, of `kind`;
    `future` done when it is in the journal, `seconds` spent writing it on the loop."""

    key: str
    kind: str
    future: asyncio.Future[None]
    seconds: float


def _saved(result: T, unsaved: Exception | None) -> T:
    """`result`, unless the change's journal write failed: then an error saying so."""
    if unsaved is not None:
        raise JournalError(
            f"the change is in force, but the journal could not record it ({unsaved}): it "
            "will not survive a restart of the daemon"
        ) from unsaved
    return result


# Ranges a RevokeAck may list as withdrawn (the SDK sends at most 32).
MAX_WITHDRAWN = 64
# Ranges a RevokeAck may list as in flight (the SDK sends at most 32).
MAX_IN_FLIGHT = 64
# Bytes of one Isolation note (the SDK cuts at 256).
MAX_ISOLATION_NOTE_BYTES = 256


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background work failed", exc_info=task.exception())


def report_to_json(r: RevocationResult) -> str:
    """A revocation report as the journal keeps it (`report_from_json` reads it back)."""
    return json.dumps(
        {
            "space_id": r.space_id,
            "seq": r.seq,
            "duration_s": r.duration_s,
            "revoked_bytes": r.revoked_bytes,
            "cause": r.cause,
            "caller_gone": r.caller_gone,
            "clients": [
                [
                    c.client,
                    c.session_id,
                    c.pid,
                    c.outcome.value,
                    c.latency_s,
                    c.reason,
                    c.fence.value if c.fence is not None else None,
                    c.withdrawn,
                    c.in_flight,
                    c.isolation,
                ]
                for c in r.clients
            ],
        }
    )


def report_from_json(text: str) -> RevocationResult:
    """ValueError, KeyError or TypeError when `text` is not a report `report_to_json` wrote."""
    d = json.loads(text)
    clients = tuple(
        ClientResult(
            str(c[0]),
            str(c[1]),
            int(c[2]),
            Outcome(c[3]),
            float(c[4]),
            str(c[5]),
            FenceResult(c[6]) if c[6] is not None else None,
            tuple((int(o), int(n)) for o, n in c[7]),
            tuple((int(o), int(n)) for o, n in c[8]),
            str(c[9]),
        )
        for c in d["clients"]
    )
    return RevocationResult(
        str(d["space_id"]),
        int(d["seq"]),
        clients,
        float(d["duration_s"]),
        int(d["revoked_bytes"]),
        str(d["cause"]),
        bool(d["caller_gone"]),
    )


def _sealed_facts(view: ProcessView, dev: int, ino: int) -> tuple[list[Vma], list[int], list[int]]:
    """What a sealed mapping's check needs of the kernel's view of the process (on a worker)."""
    return view.mappings_of(dev, ino), view.fds_of(dev, ino), view.userfaultfds()


def _check_in_flight(
    in_flight: tuple[tuple[int, int], ...], revoked: Sequence[AccessRange]
) -> None:
    """What a client says was lost in flight goes into the owner's report, so it must be
    about this revocation: a few non-empty byte ranges, sorted and disjoint, each inside the
    ranges this client was asked to give up with this seq (`revoked`, sorted). Otherwise
    ProtocolError. One forward walk over `revoked`: the cost is bounded by what the
    revocation itself pushed, whatever the client sends."""
    if len(in_flight) > MAX_IN_FLIGHT:
        raise ProtocolError(
            f"revoke_ack lists {len(in_flight)} in-flight ranges; at most {MAX_IN_FLIGHT}"
        )
    at = 0  # index into revoked: never moves back
    prev_end = -1
    for offset, length in in_flight:
        end = offset + length
        if length <= 0 or offset < prev_end:
            raise ProtocolError(
                f"revoke_ack lists in-flight ranges that are empty, unsorted or overlapping "
                f"(at {offset:#x}+{length:#x})"
            )
        prev_end = end
        at = max(at, bisect.bisect_right(revoked, offset, lo=at, key=_offset_of) - 1)
        cursor = offset
        while cursor < end:
            r = revoked[at] if 0 <= at < len(revoked) else None
            if r is None or not r.offset <= cursor < r.offset + r.length:
                raise ProtocolError(
                    f"revoke_ack lists {offset:#x}+{length:#x} as in flight, which is not in "
                    "the ranges revoked from this client with that seq"
                )
            cursor = r.offset + r.length
            if cursor < end:
                at += 1


def _offset_of(r: AccessRange) -> int:
    return r.offset


# A client holding this many grant ranges has its grants of more than FEW_RANGES ranges computed
# on a worker (see _grant_in_table): merging a batch over its sets takes milliseconds.
OFFLOAD_FRAGMENTS = 65536


def _beyond(held: Sequence[AccessRange], size: int) -> list[AccessRange]:
    """What a client holding `held` (sorted, coalesced) must not reach: every other byte of
    the space at NONE, and what it holds read-only at RO."""
    out: list[AccessRange] = []
    cursor = 0
    for r in held:
        if r.offset > cursor:
            out.append(AccessRange(cursor, r.offset - cursor, Access.NONE))
        if r.access is Access.RO:
            out.append(r)
        cursor = r.offset + r.length
    if cursor < size:
        out.append(AccessRange(cursor, size - cursor, Access.NONE))
    return out


def _lowered_bytes(change: ClientDelta) -> int:
    return change.lowered_bytes


def _cancel_call(session: Session, call_id: int) -> None:
    """A CallCancelled: as a gRPC cancellation, the call's change goes on (caller_gone)."""
    task = session.calls.get(call_id)
    if task is not None:
        task.cancel()


class CallChannelHost:
    """The frames of a session's call channel: Call and CallCancelled, run and answered as on
    the session socket. Anything else (or an fd) is a protocol error that closes the channel,
    with an Error frame, and leaves the session as it was."""

    def __init__(self, broker: Broker, session: Session) -> None:
        self.broker = broker
        self.session = session
        # The calls that came on this channel, in flight: cancelled when it closes (their
        # caller is gone, as with a session that ends: changes go on, caller_gone).
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def on_frame(self, conn: Connection, frame: spb.Frame, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        kind = frame.WhichOneof("body")
        session = self.session
        try:
            if fds:
                raise ProtocolError(f"a call channel carries no fds ({kind} came with some)")
            if session.conn.closed:
                raise ProtocolError("the session has ended")
            if kind == "call":
                call_id = frame.call.id
                task = self.tasks[call_id] = self.broker._call(session, frame.call, conn)
                task.add_done_callback(functools.partial(self._done, call_id))
            elif kind == "call_cancelled":
                _cancel_call(session, frame.call_cancelled.id)
            else:
                raise ProtocolError(
                    f"only call and call_cancelled travel on a call channel, not {kind}"
                )
        except ProtocolError as exc:
            conn.protocol_error(exc)

    def _done(self, call_id: int, task: asyncio.Task[None]) -> None:
        if self.tasks.get(call_id) is task:
            del self.tasks[call_id]

    def on_closed(self, conn: Connection) -> None:
        if self.session.channel is conn:
            self.session.channel = None
        for call_id, task in list(self.tasks.items()):
            task.cancel()
            if self.session.calls.get(call_id) is task:
                del self.session.calls[call_id]  # now: its slot is free at once

    def on_protocol_error(self, conn: Connection, error: ProtocolError) -> None:
        self.broker.metrics.protocol_errors.inc()
        log.warning(
            "call channel of session %s (pid %d): %s", self.session.session_id, conn.cred.pid, error
        )


def _sealed_update(
    sealed: SealedMapping, lowered: Sequence[AccessRange], raised: Sequence[AccessRange]
) -> None:
    sealed.lower_write(lowered)
    sealed.set_access(raised)


def _after(first: Callable[[], None], then: Callable[[], T]) -> Callable[[], T]:
    def both() -> T:
        first()
        return then()

    return both


def _view_of(pid: int) -> ProcessView | None:
    try:
        return ProcessView(pid)
    except OSError:
        return None  # gone meanwhile: write-protections then cover whole spans


def _connection_limits(config: BrokerConfig) -> dict[str, int]:
    """The per-connection buffer limits the listener enforces (see config)."""
    limits = {}
    for name in ("max_outbound_bytes", "outbound_pause_bytes"):
        value = getattr(config, name, None)
        if value is not None:
            limits[name] = int(value)
    return limits
