"""The SDK's session: one connection to membrokerd's session socket plus the gRPC control channel.

`Session` opens session.sock, says Hello, and keeps a background thread that serves the broker's
pushes (fd deliveries, access updates, revocations) promptly even while the application's own
threads are busy. Control calls go over gRPC with the session token as metadata. Owner
operations live here; attaching returns a `VaClient` or `FdClient` (membroker.clients).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.errors import (
    ConnectError,
    MembrokerError,
    ProtocolError,
    SessionClosed,
    from_rpc_error,
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
from membroker.v1 import broker_pb2_grpc as pb_grpc
from membroker.v1 import session_pb2 as spb

log = logging.getLogger("membroker")

TOKEN_KEY = "membroker-session-token"
DEFAULT_TIMEOUT = 30.0


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
    """What an attachment does with the pushes of its space (called on the session thread)."""

    def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None: ...

    def on_revoke(
        self, seq: int, ranges: list[AccessRange], space_deleted: bool, deadline_ms: int = 0
    ) -> None: ...

    def on_unpin_request(self, ranges: list[tuple[int, int]]) -> None: ...

    def on_session_closed(self, reason: str) -> None: ...


class Session:
    """A live session with membrokerd. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        name: str,
        runtime_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        rdir = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
        self.name = name
        self.timeout = timeout
        self.control_socket = rdir / "control.sock"
        self.session_socket = rdir / "session.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._fds: dict[int, int] = {}
        self._handlers: dict[str, PushHandler] = {}
        self._buffered: dict[str, list[spb.Frame]] = {}
        self._pongs: dict[int, float] = {}
        self._nonce = itertools.count(1)
        self._offer_tag = itertools.count(1)
        self._closed_reason: str | None = None
        self._fenced = False
        self._decoder = wire.FrameDecoder()
        try:
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(str(self.session_socket))
            except OSError as exc:
                raise ConnectError(
                    f"cannot connect to {self.session_socket}: {exc} "
                    "(is membrokerd running with this runtime directory?)"
                ) from exc
            self._send(
                spb.Frame(hello=spb.Hello(protocol_version=wire.PROTOCOL_VERSION, client_name=name))
            )
            welcome = self._read_welcome()
            self._sock.settimeout(None)
        except BaseException:
            self._sock.close()
            self._decoder.close()
            raise
        self.session_id = welcome.session_id
        self.token = welcome.token
        self.broker_pid = welcome.broker_pid
        self.page_size = welcome.page_size
        self._metadata = ((TOKEN_KEY, self.token),)
        self._channel = grpc.insecure_channel(f"unix:{self.control_socket}")
        self._stub = pb_grpc.MemBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._reader = threading.Thread(
            target=self._read_loop, name=f"membroker-{name}", daemon=True
        )
        self._reader.start()

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
    def fenced(self) -> bool:
        return self._fenced

    # -- frames --------------------------------------------------------------------------------

    def _send(self, frame: spb.Frame, fds: Sequence[int] = ()) -> None:
        data = memoryview(wire.encode(frame))
        with self._send_lock:
            try:
                while data:
                    sent = sys_sock.send_with_fds(self._sock, data, fds)
                    data, fds = data[sent:], ()
            except OSError as exc:
                raise SessionClosed(f"session socket broken: {exc}") from exc

    def _read_welcome(self) -> spb.Welcome:
        while True:
            data, fds, truncated = sys_sock.recv_with_fds(self._sock, 65536)
            if truncated or not data:
                for fd in fds:
                    os.close(fd)
                raise ConnectError("broker closed the session during the handshake")
            for frame, frame_fds in self._decoder.feed(data, fds):
                for fd in frame_fds:
                    os.close(fd)
                kind = frame.WhichOneof("body")
                if kind == "welcome":
                    return frame.welcome
                if kind == "error":
                    raise ConnectError(f"broker refused the session: {frame.error.message}")
                raise ConnectError(f"unexpected {kind} frame during the handshake")

    def _read_loop(self) -> None:
        reason = "session closed"
        try:
            while True:
                data, fds, truncated = sys_sock.recv_with_fds(self._sock, 256 * 1024)
                if truncated:
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("broker sent more fds than a frame carries")
                if not data:
                    reason = self._closed_reason or "broker closed the session"
                    break
                for frame, frame_fds in self._decoder.feed(data, fds):
                    self._dispatch(frame, frame_fds)
        except (OSError, MembrokerError) as exc:
            reason = self._closed_reason or f"session ended: {exc}"
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        with self._cv:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cv.notify_all()
            handlers = list(self._handlers.values())
        for handler in handlers:
            try:
                handler.on_session_closed(reason)
            except Exception:
                log.exception("session-closed handler failed")

    def _dispatch(self, frame: spb.Frame, fds: list[int]) -> None:
        kind = frame.WhichOneof("body")
        if kind == "fd_delivery":
            with self._cv:
                self._fds[frame.fd_delivery.tag] = fds[0]
                self._cv.notify_all()
        elif kind in ("access_update", "revoke"):
            space_id = getattr(frame, kind).space_id
            with self._cv:
                handler = self._handlers.get(space_id)
                if handler is None and space_id in self._buffered:
                    self._buffered[space_id].append(frame)
                    return
            self._deliver(handler, frame)
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
        elif kind == "error":
            self._closed_reason = f"broker error {frame.error.code}: {frame.error.message}"
        elif kind == "goodbye":
            self._fenced = frame.goodbye.fenced
            self._closed_reason = (
                "fenced: " if frame.goodbye.fenced else ""
            ) + frame.goodbye.reason
        else:
            log.warning("ignoring unexpected %s frame from the broker", kind)

    def _deliver(self, handler: PushHandler | None, frame: spb.Frame) -> None:
        if frame.HasField("access_update"):
            if handler is not None:
                upd = frame.access_update
                handler.on_access_update(upd.seq, [access_of(r) for r in upd.ranges])
            return
        rev = frame.revoke
        try:
            if handler is not None:
                handler.on_revoke(
                    rev.seq, [access_of(r) for r in rev.ranges], rev.space_deleted, rev.deadline_ms
                )
        finally:
            # Acknowledge only after the handler returned: by then the ranges are torn down.
            self._send(spb.Frame(revoke_ack=spb.RevokeAck(space_id=rev.space_id, seq=rev.seq)))

    # -- attachments (used by membroker.clients) -----------------------------------------------

    def _expect(self, space_id: str) -> None:
        """Buffers the pushes of a space until its handler is installed."""
        with self._cv:
            self._buffered.setdefault(space_id, [])

    def _install(self, space_id: str, handler: PushHandler, after_seq: int) -> None:
        """Installs a handler and replays the pushes newer than the attach snapshot."""
        while True:
            with self._cv:
                pending = self._buffered.get(space_id, [])
                if not pending:
                    self._buffered.pop(space_id, None)
                    self._handlers[space_id] = handler
                    return
                self._buffered[space_id] = []
            for frame in pending:
                body = frame.access_update if frame.HasField("access_update") else frame.revoke
                if body.seq > after_seq:
                    self._deliver(handler, frame)
                elif frame.HasField("revoke"):
                    self._deliver(None, frame)

    def _uninstall(self, space_id: str) -> None:
        with self._cv:
            self._handlers.pop(space_id, None)
            self._buffered.pop(space_id, None)

    def take_fd(self, tag: int, timeout: float | None = None) -> int:
        """Waits for the fd the broker delivers under `tag`; the caller owns it."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        with self._cv:
            while tag not in self._fds:
                if self._closed_reason is not None:
                    raise SessionClosed(self._closed_reason, fenced=self._fenced)
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
        """One control call with the session token; gRPC errors become typed exceptions."""
        if self._closed_reason is not None:
            raise SessionClosed(self._closed_reason, fenced=self._fenced)
        try:
            return getattr(self._stub, method)(
                request,
                metadata=self._metadata,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method, request) from exc

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
        resp = self.call("ListGrants", pb.ListGrantsRequest(space_id=space_id, client=client))
        return [(g.client, access_of(g.range)) for g in resp.grants]

    def list_sessions(self) -> list[pb.SessionInfo]:
        return list(self.call("ListSessions", pb.ListSessionsRequest()).sessions)

    def list_pins(self, space_id: str) -> list[pb.PinRecord]:
        return list(self.call("ListPins", pb.ListPinsRequest(space_id=space_id)).pins)

    def stats(self) -> pb.Stats:
        stats: pb.Stats = self.call("GetStats", pb.GetStatsRequest())
        return stats

    # -- client API ----------------------------------------------------------------------------

    def attach_va(
        self, space_id: str, on_revoke: Callable[[list[AccessRange]], None] | None = None
    ) -> VaClient:
        """Maps the space PROT_NONE and opens what this client name is granted."""
        from membroker.clients import VaClient

        return VaClient(self, space_id, on_revoke)

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
        """Ends the session: the broker releases everything it held for it."""
        if self._closed_reason is None:
            self._closed_reason = "closed by the client"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(5)
        self._sock.close()
        self._channel.close()
        with self._cv:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._decoder.close()


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

    def grants(self, client: str = "") -> list[tuple[str, AccessRange]]:
        return self.session.list_grants(self.space_id, client)

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


if TYPE_CHECKING:  # annotations only: these modules import this one
    from membroker._sys.mman import Mapping
    from membroker.clients import FdClient, VaClient

__all__ = ["OwnedSpace", "PushHandler", "Session", "backing_of", "default_runtime_dir"]
