"""The gRPC edge: validates requests, calls the broker core, and chooses every status code.

This is the only place where exceptions become gRPC status codes (`STATUS`); anything not in the
table is an INTERNAL error whose traceback is logged, never sent.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

import membrokerd
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import broker_pb2_grpc as pb_grpc
from membroker.v1 import session_pb2 as spb
from membrokerd import errors
from membrokerd.access import (
    Access,
    AccessError,
    InvalidRange,
    NotGranted,
    NotShared,
    UnknownPin,
)
from membrokerd.broker import MAX_CALLS_IN_FLIGHT, Broker, Outcome, RevocationResult
from membrokerd.enforcement import FenceResult
from membrokerd.pushes import access_range_pb
from membrokerd.sessions import Session
from membrokerd.spaces import Attachment, BackingKind, Region, Space

log = logging.getLogger("membrokerd.rpc")

TOKEN_KEY = "membroker-session-token"

STATUS: dict[type[Exception], grpc.StatusCode] = {
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRange: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownObject: grpc.StatusCode.NOT_FOUND,
    UnknownPin: grpc.StatusCode.NOT_FOUND,
    errors.NameInUse: grpc.StatusCode.ALREADY_EXISTS,
    errors.NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    errors.NoSession: grpc.StatusCode.UNAUTHENTICATED,
    errors.LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    NotShared: grpc.StatusCode.FAILED_PRECONDITION,
    NotGranted: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FeatureMissing: grpc.StatusCode.UNIMPLEMENTED,
}

BACKINGS = {
    pb.BACKING_MEMFD: BackingKind.MEMFD,
    pb.BACKING_GUEST_MEMFD: BackingKind.GUEST_MEMFD,
    pb.BACKING_MEMFD_HUGETLB: BackingKind.MEMFD_HUGETLB,
}
BACKING_PB = {v: k for k, v in BACKINGS.items()}
KINDS = {pb.ATTACH_KIND_VA: Attachment.VA, pb.ATTACH_KIND_FD: Attachment.FD}
ON_PINNED = {pb.ON_PINNED_DEFAULT: None, pb.ON_PINNED_FAIL: "fail", pb.ON_PINNED_FENCE: "fence"}
OUTCOMES = {
    Outcome.ACKED: pb.OUTCOME_ACKED,
    Outcome.FENCED: pb.OUTCOME_FENCED,
    Outcome.GONE: pb.OUTCOME_GONE,
    Outcome.UNVERIFIED: pb.OUTCOME_UNVERIFIED,
    Outcome.ENFORCED: pb.OUTCOME_ENFORCED,
}
FENCE_RESULTS = {
    None: pb.FENCE_RESULT_UNSPECIFIED,
    FenceResult.DISCONNECTED: pb.FENCE_RESULT_DISCONNECTED,
    FenceResult.KILLED: pb.FENCE_RESULT_KILLED,
    FenceResult.STILL_MAPPED: pb.FENCE_RESULT_STILL_MAPPED,
    FenceResult.EXITED: pb.FENCE_RESULT_EXITED,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Any, Session], Awaitable[Any]]


def _describe(exc: Exception) -> str:
    if isinstance(exc, NotShared):
        return f"range is not shared: offset {exc.offset:#x} is private"
    if isinstance(exc, NotGranted):
        return f"client {exc.client!r} lacks the needed access at offset {exc.offset:#x}"
    return str(exc)


def status_of(exc: Exception) -> grpc.StatusCode:
    """The status code a broker fault or access error answers with."""
    return next(
        (c for t, c in STATUS.items() if isinstance(exc, t)), grpc.StatusCode.INVALID_ARGUMENT
    )


def edge(method: Handler) -> Callable[[Any, Any, aio.ServicerContext], Awaitable[Any]]:
    """Authenticates the call, runs it, and maps exceptions to status codes."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Any, context: aio.ServicerContext) -> Any:
        name = method.__name__
        try:
            token = dict(context.invocation_metadata() or ()).get(TOKEN_KEY)
            session = self.broker.authenticate(token if isinstance(token, str) else None)
            if session is None:
                return await method(self, request, session)
            # The same bound as on the session socket: a token is not a way around it.
            if session.grpc_calls >= MAX_CALLS_IN_FLIGHT:
                raise errors.LimitReached(
                    "calls in flight per session",
                    MAX_CALLS_IN_FLIGHT,
                    f"{session.grpc_calls} gRPC calls of this session are in flight",
                )
            session.grpc_calls += 1
            try:
                return await method(self, request, session)
            finally:
                session.grpc_calls -= 1
        except (errors.BrokerFault, AccessError) as exc:
            code = status_of(exc)
            self.broker.metrics.rpc_errors.labels(code.name).inc()
            log.debug("%s refused: %s: %s", name, code.name, exc)
            await context.abort(code, _describe(exc))
        except aio.AbortError:
            raise
        except Exception:
            self.broker.metrics.rpc_errors.labels("INTERNAL").inc()
            log.exception("%s failed unexpectedly", name)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {name} (details in the broker log)"
            )

    return wrapper


# Ranges per batch call: a batch is applied on the event loop, so it is kept to what takes a few
# tens of milliseconds.
MAX_BATCH_RANGES = 16_384
# Grant records per ListGrants reply: a page is built in a few ms and fits any gRPC limit.
GRANTS_PAGE = 10_000


def _range(msg: pb.PinRequest) -> tuple[int, int]:
    if not msg.HasField("range"):
        raise errors.BadRequest("range is required")
    if msg.range.length == 0:
        raise errors.BadRequest("range length must be positive")
    return msg.range.offset, msg.range.length


def _spans(
    msg: pb.SetAttributesRequest | pb.GrantRequest | pb.RevokeRequest,
) -> list[tuple[int, int]]:
    """`range`, or the batch in `ranges` (never both)."""
    if msg.ranges:
        if msg.HasField("range"):
            raise errors.BadRequest("give range or ranges, not both")
        if len(msg.ranges) > MAX_BATCH_RANGES:
            raise errors.BadRequest(
                f"{len(msg.ranges)} ranges in one call; at most {MAX_BATCH_RANGES}"
            )
        spans = [(r.offset, r.length) for r in msg.ranges]
        if any(length == 0 for _, length in spans):
            raise errors.BadRequest("range length must be positive")
        return spans
    if not msg.HasField("range"):
        raise errors.BadRequest("range (or ranges) is required")
    if msg.range.length == 0:
        raise errors.BadRequest("range length must be positive")
    return [(msg.range.offset, msg.range.length)]


def _regions(regions: Any) -> list[Region]:
    return [Region(r.gpa, r.offset, r.size) for r in regions]


def _space_pb(space: Space) -> pb.Space:
    return pb.Space(
        space_id=space.space_id,
        name=space.name,
        size=space.size,
        backing=BACKING_PB[space.backing],
        owner=space.owner,
        ephemeral=space.ephemeral,
        seq=space.table.seq,
        regions=[pb.Region(gpa=r.gpa, offset=r.offset, size=r.size) for r in space.regions],
        shared_bytes=space.table.shared_bytes(),
        page_size=space.page_size,
        imported=space.imported,
        attachments=len(space.attachments),
        grant_clients=len(space.table.clients()),
        created_unix=space.created_unix,
    )


def _report(result: RevocationResult) -> pb.RevocationReport:
    return pb.RevocationReport(
        space_id=result.space_id,
        seq=result.seq,
        duration_us=int(result.duration_s * 1e6),
        revoked_bytes=result.revoked_bytes,
        cause=result.cause,
        caller_gone=result.caller_gone,
        clients=[
            pb.ClientOutcome(
                client=c.client,
                session_id=c.session_id,
                pid=c.pid,
                outcome=OUTCOMES[c.outcome],
                latency_us=int(c.latency_s * 1e6),
                reason=c.reason,
                fence=FENCE_RESULTS[c.fence],
                # What the client gave up with its acknowledgement.
                withdrawn=[spb.Range(offset=o, length=n) for o, n in c.withdrawn],
                # What its device had been offered there and will never touch now.
                in_flight=[spb.Range(offset=o, length=n) for o, n in c.in_flight],
                isolation=c.isolation,
            )
            for c in result.clients
        ],
    )


class Servicer(pb_grpc.MemBrokerServicer):
    """membroker.v1.MemBroker on top of a Broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @edge
    async def CreateSpace(
        self, request: pb.CreateSpaceRequest, session: Session
    ) -> pb.CreateSpaceResponse:
        backing = BACKINGS.get(request.backing)
        if backing is None:
            raise errors.BadRequest("backing must be MEMFD, MEMFD_HUGETLB or GUEST_MEMFD")
        if request.huge_page_size and backing is not BackingKind.MEMFD_HUGETLB:
            raise errors.BadRequest("huge_page_size applies to MEMFD_HUGETLB only")
        _check_name(request.name)
        space, tag = await self.broker.create_space(
            session,
            size=request.size,
            backing=backing,
            name=request.name,
            ephemeral=request.ephemeral,
            regions=_regions(request.regions),
            huge_page_size=request.huge_page_size,
        )
        return pb.CreateSpaceResponse(space=_space_pb(space), fd_tag=tag)

    @edge
    async def ImportSpace(
        self, request: pb.ImportSpaceRequest, session: Session
    ) -> pb.CreateSpaceResponse:
        _check_name(request.name)
        space = await self.broker.import_space(
            session,
            tag=request.fd_tag,
            name=request.name,
            ephemeral=request.ephemeral,
            regions=_regions(request.regions),
            expected_size=request.expected_size,
        )
        return pb.CreateSpaceResponse(space=_space_pb(space), fd_tag=0)

    @edge
    async def DeleteSpace(
        self, request: pb.DeleteSpaceRequest, session: Session
    ) -> pb.RevocationReport:
        return _report(
            await self.broker.delete_space(session, request.space_id, _on_pinned(request))
        )

    @edge
    async def GetSpace(self, request: pb.GetSpaceRequest, session: Session) -> pb.Space:
        return _space_pb(self.broker.space(request.space_id))

    @edge
    async def ListSpaces(
        self, request: pb.ListSpacesRequest, session: Session
    ) -> pb.ListSpacesResponse:
        return pb.ListSpacesResponse(
            spaces=[_space_pb(s) for s in self.broker.spaces.values() if not s.deleting]
        )

    @edge
    async def SetAttributes(
        self, request: pb.SetAttributesRequest, session: Session
    ) -> pb.RevocationReport:
        if request.attribute not in (pb.ATTRIBUTE_SHARED, pb.ATTRIBUTE_PRIVATE):
            raise errors.BadRequest("attribute must be SHARED or PRIVATE")
        return _report(
            await self.broker.set_attributes(
                session,
                request.space_id,
                _spans(request),
                request.attribute == pb.ATTRIBUTE_SHARED,
                _on_pinned(request),
            )
        )

    @edge
    async def Grant(self, request: pb.GrantRequest, session: Session) -> pb.GrantResponse:
        if request.access not in (spb.ACCESS_RO, spb.ACCESS_RW):
            raise errors.BadRequest("access must be RO or RW (use Revoke to remove access)")
        seq, notified = await self.broker.grant(
            session,
            request.space_id,
            request.client,
            _spans(request),
            Access(request.access),
            _on_pinned(request),
        )
        return pb.GrantResponse(seq=seq, notified=notified)

    @edge
    async def Revoke(self, request: pb.RevokeRequest, session: Session) -> pb.RevocationReport:
        spans = _spans(request)
        if not request.client:
            raise errors.BadRequest("client is required")
        return _report(
            await self.broker.revoke(
                session, request.space_id, request.client, spans, _on_pinned(request)
            )
        )

    @edge
    async def ListGrants(
        self, request: pb.ListGrantsRequest, session: Session
    ) -> pb.ListGrantsResponse:
        space = self.broker.space(request.space_id)
        limit = request.limit if 0 < request.limit <= GRANTS_PAGE else GRANTS_PAGE
        grants, following = space.table.grants_page(
            request.client or None, request.start_client, request.start_offset, limit
        )
        return pb.ListGrantsResponse(
            grants=[pb.GrantRecord(client=c, range=access_range_pb(r)) for c, r in grants],
            more=following is not None,
            next_client=following[0] if following else "",
            next_offset=following[1] if following else 0,
        )

    @edge
    async def ListRevocations(
        self, request: pb.ListRevocationsRequest, session: Session
    ) -> pb.ListRevocationsResponse:
        results = self.broker.revocations(session, request.space_id, request.after_seq)
        return pb.ListRevocationsResponse(reports=[_report(r) for r in results])

    @edge
    async def Attach(self, request: pb.AttachRequest, session: Session) -> pb.AttachResponse:
        kind = KINDS.get(request.kind)
        if kind is None:
            raise errors.BadRequest("kind must be VA or FD")
        if kind is Attachment.VA and request.va_mode not in (
            pb.VA_MODE_UNSPECIFIED,
            pb.VA_MODE_SEALED,
            pb.VA_MODE_COOPERATIVE,
        ):
            raise errors.BadRequest(f"va_mode {request.va_mode} is not a known mode")
        sealed = kind is Attachment.VA and request.va_mode == pb.VA_MODE_SEALED
        if request.resume:
            attached = await self.broker.resume_attach(
                session,
                request.space_id,
                kind,
                sealed=sealed,
                address=request.address,
                writable=request.writable,
            )
        else:
            attached = await self.broker.attach(session, request.space_id, kind, sealed=sealed)
        return pb.AttachResponse(
            space=_space_pb(attached.space),
            fd_tag=attached.tag,
            seq=attached.seq,
            ranges=[access_range_pb(r) for r in attached.ranges],
            ranges_on_session=attached.on_session,
            va_mode=(
                pb.VA_MODE_UNSPECIFIED
                if kind is not Attachment.VA
                else pb.VA_MODE_SEALED
                if attached.sealed
                else pb.VA_MODE_COOPERATIVE
            ),
            writable=attached.writable,
        )

    @edge
    async def Detach(self, request: pb.DetachRequest, session: Session) -> pb.DetachResponse:
        return pb.DetachResponse(released_pins=self.broker.detach(session, request.space_id))

    @edge
    async def Pin(self, request: pb.PinRequest, session: Session) -> pb.PinResponse:
        offset, length = _range(request)
        pin, seq = self.broker.pin(session, request.space_id, offset, length, request.write)
        return pb.PinResponse(pin_id=pin.pin_id, seq=seq)

    @edge
    async def Unpin(self, request: pb.UnpinRequest, session: Session) -> pb.UnpinResponse:
        self.broker.unpin(session, request.space_id, request.pin_id)
        return pb.UnpinResponse()

    @edge
    async def ListPins(self, request: pb.ListPinsRequest, session: Session) -> pb.ListPinsResponse:
        space = self.broker.space(request.space_id)
        now = time.monotonic()
        return pb.ListPinsResponse(
            pins=[
                pb.PinRecord(
                    pin_id=p.pin_id,
                    client=p.client,
                    session_id=p.holder,
                    range=spb.Range(offset=p.offset, length=p.length),
                    write=p.write,
                    age_seconds=now - p.since,
                    pid=self.broker.pid_of(p.holder),
                )
                for p in space.table.pins()
            ]
        )

    @edge
    async def ListSessions(
        self, request: pb.ListSessionsRequest, session: Session
    ) -> pb.ListSessionsResponse:
        now = time.monotonic()
        out = []
        for s in self.broker.live_sessions():
            owned = [sp.space_id for sp in self.broker.spaces.values() if sp.owner == s.name]
            pins = sum(len(sp.table.pins(s.session_id)) for sp in self.broker.spaces.values())
            out.append(
                pb.SessionInfo(
                    session_id=s.session_id,
                    client=s.name,
                    pid=s.pid,
                    uid=s.uid,
                    gid=s.conn.cred.gid,
                    attached_spaces=sorted(s.attached),
                    owned_spaces=owned,
                    pins=pins,
                    age_seconds=now - s.created,
                    sealed_spaces=sorted(s.sealed),
                    isolation=s.isolation,
                )
            )
        return pb.ListSessionsResponse(sessions=out)

    @edge
    async def GetStats(self, request: pb.GetStatsRequest, session: Session) -> pb.Stats:
        snap = self.broker.snapshot()
        return pb.Stats(
            sessions=snap.sessions,
            spaces=sum(snap.spaces_by_backing.values()),
            bytes_total=snap.bytes_shared + snap.bytes_private,
            bytes_shared=snap.bytes_shared,
            grants=snap.grant_fragments,
            pins=snap.pins,
            revocations_total=self.broker.revocations_total,
            fenced_total=self.broker.fenced_total,
            unverified_total=self.broker.unverified_total,
            open_fds=snap.open_fds,
            metrics_url=self.broker.metrics_url,
            version=membrokerd.__version__,
            pid=_pid(),
            uptime_seconds=time.monotonic() - self.broker.started,
        )

    @edge
    async def Upgrade(self, request: pb.UpgradeRequest, session: Session) -> pb.UpgradeResponse:
        """Live upgrade (see membrokerd.server): answered first, then the daemon re-executes."""
        import os
        import sys

        if session.uid not in (0, os.geteuid()):
            raise errors.NotAllowed(
                f"only root or the daemon's uid {os.geteuid()} may upgrade it, not uid "
                f"{session.uid}"
            )
        start = self.broker.request_upgrade
        if start is None:
            raise errors.WrongState("this daemon cannot be upgraded (not serving)")
        # A moment later, so that this answer leaves before the sessions are closed.
        self.broker.loop.call_later(UPGRADE_DELAY_S, start)
        return pb.UpgradeResponse(pid=os.getpid(), argv=list(sys.orig_argv))


# How long after answering Upgrade the daemon starts handing over.
UPGRADE_DELAY_S = 0.05


def _pid() -> int:
    import os

    return os.getpid()


def _on_pinned(
    request: pb.RevokeRequest | pb.SetAttributesRequest | pb.GrantRequest | pb.DeleteSpaceRequest,
) -> str | None:
    if request.on_pinned not in ON_PINNED:
        raise errors.BadRequest("on_pinned must be DEFAULT, FAIL or FENCE")
    return ON_PINNED[request.on_pinned]


def _check_name(name: str) -> None:
    if len(name) > 128 or any(not c.isprintable() for c in name):
        raise errors.BadRequest("name must be at most 128 printable characters")


class SessionCalls:
    """Control calls that come on the session socket (`Call` frames): every unary method of the
    service, run by the same code as over gRPC (validation, policy, the per-space queue) as the
    session's own process, answered with `CallResult` frames. The owner's hot path: a Unix
    socket round trip instead of a gRPC one."""

    def __init__(self, servicer: Servicer, max_frame_bytes: int) -> None:
        self.servicer = servicer
        self.max_body = max_frame_bytes - 64  # room for the frame's own fields
        self.methods: dict[str, tuple[Any, Handler]] = {}
        for method in pb.DESCRIPTOR.services_by_name["MemBroker"].methods:
            request_class = getattr(pb, method.input_type.name)
            wrapped = getattr(type(servicer), method.name)
            self.methods[method.name] = (request_class, wrapped.__wrapped__)

    async def run(self, session: Session, call: spb.Call) -> spb.CallResult:
        entry = self.methods.get(call.method)
        if entry is None:
            return self._failed(call, grpc.StatusCode.UNIMPLEMENTED, f"no method {call.method!r}")
        request_class, handler = entry
        try:
            request = request_class.FromString(call.body)
        except DecodeError:
            return self._failed(
                call,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"body is not a valid {request_class.DESCRIPTOR.name}",
            )
        try:
            response = await handler(self.servicer, request, session)
        except (errors.BrokerFault, AccessError) as exc:
            code = status_of(exc)
            log.debug("%s (session) refused: %s: %s", call.method, code.name, exc)
            return self._failed(call, code, _describe(exc))
        except Exception:
            log.exception("%s (session) failed unexpectedly", call.method)
            return self._failed(
                call,
                grpc.StatusCode.INTERNAL,
                f"internal error in {call.method} (details in the broker log)",
            )
        body = response.SerializeToString()
        if len(body) > self.max_body:
            return self._failed(
                call,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the {len(body)}-byte response does not fit a session frame; call it over gRPC",
            )
        return spb.CallResult(id=call.id, body=body)

    def _failed(self, call: spb.Call, code: grpc.StatusCode, message: str) -> spb.CallResult:
        self.servicer.broker.metrics.rpc_errors.labels(code.name).inc()
        return spb.CallResult(id=call.id, code=code.value[0], message=message[:4096])
