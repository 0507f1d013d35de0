"""membroker: the SDK for membrokerd, the guest-memory broker.

Open a `Session` (`connect`), then as an owner create or import a space and share, grant and
revoke its ranges; as a client attach to a space as a `VaClient` (maps it) or `FdClient` (uses
fd+offset and pins).
"""

from membroker.clients import FdClient, NotHeld, Pin, VaClient
from membroker.errors import (
    AlreadyExists,
    BrokerError,
    ConnectError,
    FailedPrecondition,
    InvalidArgument,
    MembrokerError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    SessionClosed,
    Unauthenticated,
    Unimplemented,
)
from membroker.session import OwnedSpace, Session
from membroker.types import Access, AccessRange, ClientOutcome, Region, RevocationReport, SpaceInfo

__version__ = "0.1.0"


def connect(
    name: str, runtime_dir: str | None = None, *, timeout: float = 30.0, calls: str = "session"
) -> Session:
    """Opens a session with membrokerd as client `name` (runtime_dir: where its sockets are).

    calls: "session" (default) sends control calls on the session socket, "grpc" on the
    control socket; the broker runs the same methods either way."""
    return Session(name, runtime_dir, timeout=timeout, calls=calls)


__all__ = [
    "Access",
    "AccessRange",
    "AlreadyExists",
    "BrokerError",
    "ClientOutcome",
    "ConnectError",
    "FailedPrecondition",
    "FdClient",
    "InvalidArgument",
    "MembrokerError",
    "NotFound",
    "NotHeld",
    "OwnedSpace",
    "PermissionDenied",
    "Pin",
    "ProtocolError",
    "Region",
    "ResourceExhausted",
    "RevocationReport",
    "Session",
    "SessionClosed",
    "SpaceInfo",
    "Unauthenticated",
    "Unimplemented",
    "VaClient",
    "connect",
]
