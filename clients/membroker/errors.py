"""The SDK's exceptions: one root, typed subclasses that keep the failed request.

    MembrokerError
    ├── ProtocolError          a malformed session frame (either side)
    ├── SessionClosed          the broker ended the session (.reason, .fenced)
    ├── TeardownFailed         a revoked range could not be torn down (sent as a refusal)
    ├── ConnectError           the broker's sockets cannot be reached
    └── BrokerError            a control call failed (.code, .details, .method, .request)
        ├── InvalidArgument    bad size, alignment, range or enum
        ├── NotFound           unknown space, pin or client
        ├── AlreadyExists      a client name already in use by a live session
        ├── PermissionDenied   not the owner / not allowed by policy
        ├── Unauthenticated    no live session token
        ├── ResourceExhausted  a quota or limit (named in the details)
        ├── FailedPrecondition wrong state: range private, not granted, pinned ...
        ├── Aborted            stale epoch
        ├── Unimplemented      the kernel or build lacks a feature
        └── Unavailable        the broker went away mid-call
            └── BrokerRestarting   it restarts or upgrades; the session is resuming: retry

gRPC status codes are turned into these in exactly one place, `from_rpc_error`. A cancelled call
(`KeyboardInterrupt`, `CancelledError`) is never wrapped.
"""

from __future__ import annotations

from typing import Any

import grpc


class MembrokerError(Exception):
    """Root of every error the SDK raises on purpose."""


class ProtocolError(MembrokerError):
    """A session frame broke the protocol (size, fds, type, decoding)."""

    def __init__(self, message: str, *, code: int = 3) -> None:
        super().__init__(message)
        self.code = code


class SessionClosed(MembrokerError):
    """The broker closed the session (shutdown, fencing, or a protocol error)."""

    def __init__(self, reason: str, *, fenced: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fenced = fenced


class TeardownFailed(MembrokerError):
    """A revoked range could not be torn down; the SDK refuses the revocation with this reason.

    Raised on the session thread from a client's revoke handler, never to the application:
    the broker gets `RevokeRefused{space_id, seq, reason}` instead of an acknowledgement.
    """

    def __init__(self, space_id: str, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.space_id = space_id
        self.seq = seq
        self.reason = reason


class ConnectError(MembrokerError):
    """The broker's sockets cannot be reached or the handshake failed."""


class BrokerBusy(ConnectError):
    """The broker turned the connection away for now (too many connections of this uid still
    handshaking); `membroker.connect` tries again until its timeout."""


class BrokerError(MembrokerError):
    """A control call failed; `code` is the gRPC status, `details` the broker's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        method: str = "",
        request: Any = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(f"{method}: {details}" if method else details)
        self.details = details
        self.method = method
        self.request = request
        if code is not None:
            self.code = code


class InvalidArgument(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BrokerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(BrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(BrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(BrokerError):
    code = grpc.StatusCode.ABORTED


class Unimplemented(BrokerError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE


class BrokerRestarting(Unavailable):
    """The broker restarted, or is upgrading, and this session is resuming: the call was not
    carried out (or its answer was lost with the connection; a change it started may have
    been made). Retryable: call again in a moment. The session reconnects by itself, with
    backoff, for up to its `resume` seconds; if it cannot, it ends (SessionClosed)."""

    retryable = True


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Unimplemented,
        Unavailable,
    )
}


def from_rpc_error(err: grpc.RpcError, method: str, request: Any) -> BrokerError:
    """The typed exception for a failed call (the caller raises it `from err`)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    return from_status(code, details, method, request)


def from_status(code: grpc.StatusCode, details: str, method: str, request: Any) -> BrokerError:
    """The typed exception for a status code and its details (gRPC or session answers)."""
    cls = _BY_CODE.get(code, BrokerError)
    return cls(details, method=method, request=request, code=code)
