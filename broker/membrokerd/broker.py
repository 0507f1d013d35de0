"""The broker core: sessions, spaces and the revocation engine, on the event loop thread.

The servicer (gRPC edge) and the session listener call in here. State changes are made
synchronously by the pure access table, which answers "what changed, for whom"; this module then
does the I/O: pushes on session sockets, waits for acknowledgements, fences whoever does not
answer, and reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterable
from typing import cast

from membroker import wire
from membroker._sys import kvm as sys_kvm
from membroker._sys import sock as sys_sock
from membroker._sys.proc import ProcessView, process_groups
from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as spb
from membrokerd import policy
from membrokerd.access import Access, AccessRange, Delta, Pin
from membrokerd.config import BrokerConfig
from membrokerd.errors import (
    BadRequest,
    LimitReached,
    NoSession,
    NotAllowed,
    RangePinned,
    UnknownObject,
    WrongState,
)
from membrokerd.listener import Connection
from membrokerd.metrics import Metrics, Snapshot
from membrokerd.policy import Identity
from membrokerd.revocation import Ack, Batch
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
from membrokerd.verify import check_holdings, check_revoked

log = logging.getLogger("membrokerd")

CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
HELLO_TIMEOUT_S = 10.0


class Outcome(enum.Enum):
    ACKED = "acked"
    FENCED = "fenced"
    GONE = "gone"


@dataclasses.dataclass(frozen=True, slots=True)
class ClientResult:
    client: str
    session_id: str
    pid: int
    outcome: Outcome
    latency_s: float
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RevocationResult:
    space_id: str
    seq: int
    clients: tuple[ClientResult, ...]
    duration_s: float
    revoked_bytes: int


class Session:
    """A process that said Hello: its identity, attachments, offered fds and awaited acks."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.session_id = "se-" + secrets.token_hex(4)
        self.token = secrets.token_urlsafe(24)
        self.created = time.monotonic()
        self.attached: dict[str, Attachment] = {}
        self.offered: dict[int, int] = {}
        self.pending_acks: dict[tuple[str, int], Ack] = {}
        self.identity = Identity(
            conn.cred.pid, conn.cred.uid, conn.cred.gid, frozenset({conn.cred.gid})
        )
        # The kernel's view of the process (None when verification is off).
        self.view: ProcessView | None = None
        # space id -> where this (VA) client says it mapped the space
        self.va_base: dict[str, int] = {}
        self._next_tag = 1

    @property
    def pid(self) -> int:
        return self.conn.cred.pid

    @property
    def uid(self) -> int:
        return self.conn.cred.uid

    def next_tag(self) -> int:
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        return tag

    def deliver_fd(self, fd: int, space_id: str) -> int:
        """Sends a space's fd on the session socket; returns the tag the reply names."""
        tag = self.next_tag()
        self.conn.send(spb.Frame(fd_delivery=spb.FdDelivery(tag=tag, space_id=space_id)), [fd])
        return tag

    def __repr__(self) -> str:
        return (
            f"<Session {self.session_id} {self.name!r} pid={self.pid} "
            f"attached={sorted(self.attached)}>"
        )


class Broker:
    """Everything the daemon knows, and every operation the control plane offers."""

    def __init__(self, config: BrokerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.started = time.monotonic()
        self.spaces: dict[str, Space] = {}
        self.sessions: dict[Connection, Session | None] = {}
        self._by_token: dict[str, Session] = {}
        self._by_name: dict[str, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._gmem: sys_kvm.GuestMemfdFactory | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.revocations_total = 0
        self.fenced_total = 0
        self.metrics = Metrics(self.snapshot)
        self.metrics_url = ""

    # -- sessions ------------------------------------------------------------------------------

    def accept(self, sock: socket.socket, cred: sys_sock.PeerCred, pidfd: int) -> None:
        conn = Connection(self.loop, sock, self, self.config.max_frame_bytes, cred, pidfd)
        if len(self.sessions) >= self.config.max_sessions:
            conn.send(
                spb.Frame(
                    error=spb.Error(
                        code=8,
                        message=f"too many sessions (limit max_sessions = "
                        f"{self.config.max_sessions})",
                    )
                )
            )
            conn.close("session limit")
            return
        self.sessions[conn] = None
        self.loop.call_later(HELLO_TIMEOUT_S, self._hello_timeout, conn)

    def _hello_timeout(self, conn: Connection) -> None:
        if not conn.closed and self.sessions.get(conn) is None:
            self.on_protocol_error(conn, ProtocolError("no Hello within 10 s"))
            conn.send(spb.Frame(error=spb.Error(code=4, message="no Hello within 10 s")))
            conn.close("hello timeout")

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
                self._ack(session, frame.revoke_ack)
            elif kind == "fd_offer":
                self._offer(session, frame.fd_offer.tag, fds)
                fds = []
            elif kind == "mapped":
                self._mapped(session, frame.mapped)
            elif kind == "ping":
                conn.send(spb.Frame(pong=spb.Pong(nonce=frame.ping.nonce)))
            elif kind == "goodbye":
                conn.close("client said goodbye")
            else:
                raise ProtocolError(f"a client may not send {kind} frames")
        except ProtocolError as exc:
            self.on_protocol_error(conn, exc)
            conn.send(spb.Frame(error=spb.Error(code=exc.code, message=str(exc))))
            conn.close(f"protocol error: {exc}")
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
        if not CLIENT_NAME.match(hello.client_name):
            raise ProtocolError(
                f"client name {hello.client_name!r} must be 1-64 characters of "
                "letters, digits and . _ : @ -, starting with a letter or digit"
            )
        if hello.client_name in self._by_name:
            other = self._by_name[hello.client_name]
            raise ProtocolError(
                f"client name {hello.client_name!r} is in use by the session of pid {other.pid}",
                code=6,
            )
        try:
            groups = process_groups(conn.cred.pid)
        except OSError:
            groups = frozenset({conn.cred.gid})
        who = Identity(conn.cred.pid, conn.cred.uid, conn.cred.gid, groups)
        try:
            policy.check_name(self.config, who, hello.client_name)
            policy.check_sessions(
                self.config, who, sum(1 for s in self.live_sessions() if s.uid == who.uid)
            )
        except NotAllowed as exc:
            raise ProtocolError(str(exc), code=7) from None
        except LimitReached as exc:
            raise ProtocolError(str(exc), code=8) from None
        session = Session(conn, hello.client_name)
        session.identity = who
        if self.config.verify == "always":
            try:
                session.view = ProcessView(conn.cred.pid)
            except OSError as exc:
                raise ProtocolError(
                    f"cannot inspect process {conn.cred.pid} ({exc.strerror}): verification "
                    "needs its /proc maps and pagemap (CAP_SYS_PTRACE for other users' "
                    "processes), or verify = off",
                    code=7,
                ) from exc
            if not sys_sock.pidfd_is_alive(conn.pidfd):
                session.view.close()
                raise ProtocolError("the process exited during the handshake")
        self.sessions[conn] = session
        self._by_token[session.token] = session
        self._by_name[session.name] = session
        self._by_id[session.session_id] = session
        conn.send(
            spb.Frame(
                welcome=spb.Welcome(
                    session_id=session.session_id,
                    token=session.token,
                    protocol_version=wire.PROTOCOL_VERSION,
                    max_frame_bytes=self.config.max_frame_bytes,
                    broker_pid=os.getpid(),
                    page_size=os.sysconf("SC_PAGE_SIZE"),
                )
            )
        )
        log.info(
            "session %s: client %r pid %d uid %d",
            session.session_id,
            session.name,
            session.pid,
            session.uid,
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

    def _ack(self, session: Session, ack: spb.RevokeAck) -> None:
        awaited = session.pending_acks.pop((ack.space_id, ack.seq), None)
        if awaited is None:
            raise ProtocolError(
                f"revoke_ack for space {ack.space_id!r} seq {ack.seq}, "
                "which this session was not asked to acknowledge"
            )
        awaited.acknowledge(time.perf_counter())

    def on_closed(self, conn: Connection) -> None:
        session = self.sessions.pop(conn, None)
        if session is None:
            return
        self._by_token.pop(session.token, None)
        self._by_id.pop(session.session_id, None)
        if self._by_name.get(session.name) is session:
            del self._by_name[session.name]
        for fd in session.offered.values():
            os.close(fd)
        session.offered.clear()
        if session.view is not None:
            session.view.close()
            session.view = None
        for awaited in session.pending_acks.values():
            awaited.lose(f"session ended: {conn.close_reason}")
        session.pending_acks.clear()
        for space_id in list(session.attached):
            space = self.spaces.get(space_id)
            if space is not None:
                self._detach(space, session)
        for space in list(self.spaces.values()):
            if space.ephemeral and space.owner == session.name and not space.deleting:
                self._spawn(self.delete_space_now(space, "owner session ended"))
        log.info(
            "session %s (%r, pid %d) ended: %s",
            session.session_id,
            session.name,
            session.pid,
            conn.close_reason,
        )

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[object] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fence(self, session: Session, kind: str, reason: str) -> str:
        """Closes a non-compliant session, drops every grant of its name and, with
        `fence_action = "kill"`, kills the process through the pidfd taken at accept (never a
        bare pid, which could have been reused). Returns the reason as reported."""
        if session.conn.closed:
            return reason
        if self.config.fence_action == "kill":
            try:
                sys_sock.pidfd_send_signal(session.conn.pidfd, signal.SIGKILL)
                reason += "; killed with SIGKILL"
            except ProcessLookupError:
                reason += "; the process had already exited"
            except OSError as exc:
                reason += f"; SIGKILL failed: {exc}"
        self.fenced_total += 1
        self.metrics.fenced.labels(kind).inc()
        log.warning(
            "fencing client %r (session %s, pid %d): %s",
            session.name,
            session.session_id,
            session.pid,
            reason,
        )
        session.conn.send(spb.Frame(goodbye=spb.Goodbye(reason=reason, fenced=True)))
        session.conn.close(f"fenced: {reason}")
        for space in self.spaces.values():
            space.table.drop_client(session.name)
        return reason

    # -- spaces --------------------------------------------------------------------------------

    def space(self, space_id: str) -> Space:
        space = self.spaces.get(space_id)
        if space is None or space.deleting:
            raise UnknownObject(f"no space {space_id!r}")
        return space

    def owned_space(self, session: Session, space_id: str) -> Space:
        space = self.space(space_id)
        if space.owner != session.name or space.owner_uid != session.uid:
            raise NotAllowed(
                f"client {session.name!r} is not the owner of space {space_id} "
                f"(owner: {space.owner!r})"
            )
        return space

    def _check_space_quota(self, session: Session, size: int) -> None:
        """Policy (may this identity own spaces?) and quotas, before anything is allocated."""
        policy.check_owner(self.config, session.identity)
        if len(self.spaces) >= self.config.max_spaces:
            raise LimitReached("max_spaces", self.config.max_spaces, "too many spaces")
        owned = [s for s in self.spaces.values() if s.owner == session.name]
        policy.check_owner_quota(
            self.config, session.name, len(owned), sum(s.size for s in owned), size
        )

    def create_space(
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
        self.spaces[space.space_id] = space
        tag = session.deliver_fd(space.fd, space.space_id)
        log.info(
            "space %s created by %r: %s, %d bytes",
            space.space_id,
            session.name,
            backing.value,
            size,
        )
        return space, tag

    def import_space(
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
        self.spaces[space.space_id] = space
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
        return await self.delete_space_now(space, "deleted", on_pinned)

    async def delete_space_now(
        self, space: Space, why: str, on_pinned: str | None = "fence"
    ) -> RevocationResult:
        """Revokes everything from every attached session, then frees the space."""
        t0 = time.perf_counter()
        fenced = await self._clear_pins(space, 0, space.size, None, on_pinned)
        space.deleting = True
        seq = space.table.seq + 1
        whole = (AccessRange(0, space.size, Access.NONE),)
        batch = Batch(self.loop)
        for session_id in list(space.attachments):
            session = self._session_by_id(session_id)
            if session is not None:
                self._push_revoke(batch, space, session, seq, whole, space_deleted=True)
        result = await self._settle(space, seq, batch, "delete", t0, space.size, fenced)
        for session_id in list(space.attachments):
            session = self._session_by_id(session_id)
            if session is not None:
                self._detach(space, session)
        self.spaces.pop(space.space_id, None)
        space.close()
        log.info("space %s deleted (%s)", space.space_id, why)
        return result

    def _session_by_id(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    # -- access --------------------------------------------------------------------------------

    async def set_attributes(
        self,
        session: Session,
        space_id: str,
        offset: int,
        length: int,
        shared: bool,
        on_pinned: str | None = None,
    ) -> RevocationResult:
        space = self.owned_space(session, space_id)
        t0 = time.perf_counter()
        if shared:
            delta = space.table.set_shared(offset, length)
            return await self.carry_out(space, delta, "shared", t0)
        space.table.effective_access("", offset, length)  # validates the range up front
        fenced = await self._clear_pins(space, offset, length, None, on_pinned)
        delta = space.table.set_private(offset, length)
        return await self.carry_out(space, delta, "private", t0, fenced)

    async def grant(
        self,
        session: Session,
        space_id: str,
        client: str,
        offset: int,
        length: int,
        access: Access,
        on_pinned: str | None = None,
    ) -> tuple[int, int]:
        space = self.owned_space(session, space_id)
        if not CLIENT_NAME.match(client):
            raise BadRequest(f"client name {client!r} is not a valid client name")
        policy.check_grant_quota(self.config, client, space.table.fragment_count(client))
        t0 = time.perf_counter()
        fenced: list[ClientResult] = []
        if access is Access.RO and space.table.is_shared(offset, length):
            fenced = await self._clear_pins(
                space, offset, length, client, on_pinned, write_only=True
            )
        delta = space.table.grant(client, offset, length, access)
        self.metrics.grants.inc()
        notified = self._attached(space, client) is not None
        await self.carry_out(space, delta, "downgrade", t0, fenced)
        return delta.seq, int(notified)

    async def revoke(
        self,
        session: Session,
        space_id: str,
        client: str,
        offset: int,
        length: int,
        on_pinned: str | None = None,
    ) -> RevocationResult:
        space = self.owned_space(session, space_id)
        t0 = time.perf_counter()
        space.table.effective_access(client, offset, length)  # validates the range up front
        fenced = await self._clear_pins(space, offset, length, client, on_pinned)
        delta = space.table.revoke(client, offset, length)
        return await self.carry_out(space, delta, "revoke", t0, fenced)

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
        results = []
        for holder_id in dict.fromkeys(p.holder for p in pins):
            holder = self._by_id.get(holder_id)
            if holder is None:
                continue
            first = next(p for p in pins if p.holder == holder_id)
            reason = self.fence(
                holder,
                "pinned",
                (
                    f"offset {max(first.offset, offset):#x} still pinned (pin {first.pin_id}) "
                    f"after {deadline_ms} ms"
                ),
            )
            results.append(
                ClientResult(
                    holder.name,
                    holder.session_id,
                    holder.pid,
                    Outcome.FENCED,
                    time.perf_counter() - t_wait,
                    reason,
                )
            )
        return results

    def _attached(self, space: Space, client: str) -> Session | None:
        session = self._by_name.get(client)
        if session is not None and space.space_id in session.attached:
            return session
        return None

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
        the same bytes: each distinct frame is encoded once per fan-out.
        """
        batch = Batch(self.loop)
        encoded: dict[tuple[str, tuple[AccessRange, ...]], bytes] = {}
        revoked = 0
        for change in delta.clients:
            session = self._attached(space, change.client)
            revoked += sum(r.length for r in change.lowered)
            if session is None:
                continue
            if change.raised:
                key = ("update", change.raised)
                data = encoded.get(key)
                if data is None:
                    data = encoded[key] = wire.encode(
                        spb.Frame(
                            access_update=spb.AccessUpdate(
                                space_id=space.space_id,
                                seq=delta.seq,
                                ranges=[access_range_pb(r) for r in change.raised],
                            )
                        )
                    )
                session.conn.send_encoded(data)
            if change.lowered:
                self._push_revoke(batch, space, session, delta.seq, change.lowered, encoded=encoded)
        if not revoked and not fenced:
            return RevocationResult(space.space_id, delta.seq, (), time.perf_counter() - t0, 0)
        return await self._settle(space, delta.seq, batch, cause, t0, revoked, fenced)

    def _push_revoke(
        self,
        batch: Batch,
        space: Space,
        session: Session,
        seq: int,
        ranges: Iterable[AccessRange],
        space_deleted: bool = False,
        encoded: dict[tuple[str, tuple[AccessRange, ...]], bytes] | None = None,
    ) -> None:
        ranges = tuple(ranges)
        session.pending_acks[(space.space_id, seq)] = batch.expect(
            session, space.space_id, seq, ranges
        )
        key = ("revoke", ranges)
        data = encoded.get(key) if encoded is not None else None
        if data is None:
            data = wire.encode(
                spb.Frame(
                    revoke=spb.Revoke(
                        space_id=space.space_id,
                        seq=seq,
                        ranges=[access_range_pb(r) for r in ranges],
                        space_deleted=space_deleted,
                        deadline_ms=self.config.revoke_deadline_ms,
                    )
                )
            )
            if encoded is not None:
                encoded[key] = data
        session.conn.send_encoded(data)

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
        await batch.wait(self.config.revoke_deadline_ms / 1000)
        results = list(fenced or ())
        for ack in batch.acks:
            session = ack.session
            problem = self._verify(space, ack) if ack.acked_at is not None else None
            if problem is not None:
                session.pending_acks.pop((space.space_id, seq), None)
                reason = self.fence(session, "verify", f"acknowledged seq {seq} but {problem}")
                outcome, latency = Outcome.FENCED, time.perf_counter() - ack.sent
            elif ack.acked_at is not None:
                outcome, latency, reason = Outcome.ACKED, ack.acked_at - ack.sent, ""
                released = space.table.release_pins(
                    session.session_id, [(r.offset, r.length) for r in ack.ranges]
                )
                if released:
                    log.info(
                        "released %d pin(s) of %r on acknowledged revoke",
                        len(released),
                        session.name,
                    )
            elif ack.lost is not None:
                outcome, latency, reason = Outcome.GONE, time.perf_counter() - ack.sent, ack.lost
            else:
                session.pending_acks.pop((space.space_id, seq), None)
                reason = (
                    f"no acknowledgement of seq {seq} within {self.config.revoke_deadline_ms} ms"
                )
                reason = self.fence(session, "no_ack", reason)
                outcome, latency = Outcome.FENCED, time.perf_counter() - ack.sent
            results.append(
                ClientResult(
                    session.name, session.session_id, session.pid, outcome, latency, reason
                )
            )
        duration = time.perf_counter() - t0
        self.revocations_total += 1
        self.metrics.revoked(cause, duration, [r.outcome.value for r in results])
        return RevocationResult(space.space_id, seq, tuple(results), duration, revoked)

    def _verify(self, space: Space, ack: Ack) -> str | None:
        """What the acknowledging process still reaches of the revoked ranges (None: nothing)."""
        view = ack.session.view
        if view is None or ack.session.conn.closed:
            return None
        try:
            return check_revoked(
                view,
                space.dev,
                space.ino,
                ack.ranges,
                space.page_size,
                ack.session.va_base.get(space.space_id),
            )
        except OSError as exc:
            # The process is gone (ESRCH): nothing of it can touch memory any more.
            log.info("cannot verify %r (%s): treating as gone", ack.session.name, exc)
            return None

    async def audit_forever(self) -> None:
        """Every audit_interval_s, scans every attached client's mappings in full."""
        while True:
            await asyncio.sleep(self.config.audit_interval_s)
            self.audit()

    def audit(self) -> list[tuple[str, str]]:
        """One full audit; fences whoever maps what it does not hold. Returns the fenced."""
        t0 = time.perf_counter()
        fenced = []
        for session in self.live_sessions():
            if session.view is None:
                continue
            for space_id in list(session.attached):
                space = self.spaces.get(space_id)
                if space is None or session.conn.closed or space.owner == session.name:
                    continue
                if any(key[0] == space_id for key in session.pending_acks):
                    continue  # a revocation is in flight: the verifier has this one
                try:
                    problem = check_holdings(
                        session.view,
                        space.dev,
                        space.ino,
                        space.table.effective(session.name),
                        space.page_size,
                    )
                except OSError:
                    continue
                if problem is not None:
                    reason = self.fence(session, "audit", f"audit of {space_id}: {problem}")
                    fenced.append((session.name, reason))
        self.metrics.audits.inc()
        self.metrics.audit_seconds.observe(time.perf_counter() - t0)
        return fenced

    # -- clients -------------------------------------------------------------------------------

    def attach(
        self, session: Session, space_id: str, kind: Attachment
    ) -> tuple[Space, int, list[AccessRange]]:
        space = self.space(space_id)
        policy.check_attach(self.config, session.identity)
        if space_id in session.attached:
            raise WrongState(f"client {session.name!r} is already attached to {space_id}")
        session.attached[space_id] = kind
        space.attachments[session.session_id] = kind
        tag = session.deliver_fd(space.fd, space.space_id)
        return space, tag, space.table.effective(session.name)

    def detach(self, session: Session, space_id: str) -> int:
        space = self.space(space_id)
        if space_id not in session.attached:
            raise WrongState(f"client {session.name!r} is not attached to {space_id}")
        return self._detach(space, session)

    def _detach(self, space: Space, session: Session) -> int:
        session.attached.pop(space.space_id, None)
        space.attachments.pop(session.session_id, None)
        for key in [k for k in session.pending_acks if k[0] == space.space_id]:
            session.pending_acks.pop(key).lose("detached")
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
        return space.table.pin(
            session.session_id, session.name, offset, length, write
        ), space.table.seq

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

    def pid_of(self, session_id: str) -> int:
        found = self._session_by_id(session_id)
        return found.pid if found else 0

    def session_name_of(self, session_id: str) -> str:
        found = self._session_by_id(session_id)
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
        return Snapshot(
            sessions=len(self._by_token),
            spaces_by_backing=by_backing,
            bytes_shared=shared,
            bytes_private=total - shared,
            grant_fragments=fragments,
            pins=pins,
            attachments=attachments,
            open_fds=len(os.listdir("/proc/self/fd")),
        )

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        """Tells every session, closes them, frees every space."""
        for conn in list(self.sessions):
            conn.send(spb.Frame(goodbye=spb.Goodbye(reason=reason)))
            conn.close(reason)
        for task in list(self._tasks):
            task.cancel()
        for space in self.spaces.values():
            space.close()
        self.spaces.clear()
        if self._gmem is not None:
            self._gmem.close()
            self._gmem = None


def access_range_pb(r: AccessRange) -> spb.AccessRange:
    """The wire form of an access-table range (the enums share their numbers by design)."""
    return spb.AccessRange(offset=r.offset, length=r.length, access=cast(spb.Access, int(r.access)))
