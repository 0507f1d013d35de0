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

gRPC status codes are turned into these in exactly one place, `from_status` (`from_rpc_error`
for a failed gRPC call). A cancelled call (`KeyboardInterrupt`, `CancelledError`) is never
wrapped.

This module does not import grpc, nor does the SDK until a call travels over gRPC or someone
reads a `BrokerError.code`: a client that only uses its session socket never loads it. That
keeps ~60 mappings (grpc's extension and the libssl, libcrypto and asyncio it brings) out of
the client process, and the broker walks every mapping of a client each time it verifies a
revocation of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

# gRPC's status codes by number (the numbers are the protocol's; grpc.StatusCode has the same
# names: tests/unit/test_sdk_protocol.py checks them): session frames carry the number.
CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


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
    """A control call failed; `code` is the gRPC status (`code_name` its name, which needs no
    grpc import), `details` the broker's message."""

    code_name: str = "UNKNOWN"

    def __init__(
        self,
        details: str,
        *,
        method: str = "",
        request: Any = None,
        code: grpc.StatusCode | str | None = None,
    ) -> None:
        super().__init__(f"{method}: {details}" if method else details)
        self.details = details
        self.method = method
        self.request = request
        if code is not None:
            self.code_name = code if isinstance(code, str) else code.name

    @property
    def code(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.code_name]


class InvalidArgument(BrokerError):
    code_name = "INVALID_ARGUMENT"


class NotFound(BrokerError):
    code_name = "NOT_FOUND"


class AlreadyExists(BrokerError):
    code_name = "ALREADY_EXISTS"


class PermissionDenied(BrokerError):
    code_name = "PERMISSION_DENIED"


class Unauthenticated(BrokerError):
    code_name = "UNAUTHENTICATED"


class ResourceExhausted(BrokerError):
    code_name = "RESOURCE_EXHAUSTED"


class FailedPrecondition(BrokerError):
    code_name = "FAILED_PRECONDITION"


class Aborted(BrokerError):
    code_name = "ABORTED"


class Unimplemented(BrokerError):
    code_name = "UNIMPLEMENTED"


class Unavailable(BrokerError):
    code_name = "UNAVAILABLE"


class BrokerRestarting(Unavailable):
    """The broker restarted, or is upgrading, and this session is resuming: the call was not
    carried out (or its answer was lost with the connection; a change it started may have
    been made). Retryable: call again in a moment. The session reconnects by itself, with
    backoff, for up to its `resume` seconds; if it cannot, it ends (SessionClosed)."""

    retryable = True


_BY_CODE: dict[str, type[BrokerError]] = {
    cls.code_name: cls
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
    """The typed exception for a failed gRPC call (the caller raises it `from err`)."""
    import grpc

    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    return from_status(code.name, details, method, request)


def from_status(code: int | str, details: str, method: str, request: Any) -> BrokerError:
    """The typed exception for a status code (its number, as a session frame carries it, or
    its name) and its details."""
    name = CODE_NAMES.get(code, "UNKNOWN") if isinstance(code, int) else code
    cls = _BY_CODE.get(name, BrokerError)
    return cls(details, method=method, request=request, code=name)
