"""membroker: the SDK for membrokerd, the guest-memory broker.

Open a `Session` (`connect`), then as an owner create or import a space and share, grant and
revoke its ranges; as a client attach to a space as a `VaClient` (maps it) or `FdClient` (uses
fd+offset and pins).
"""

import time

from membroker.clients import FdClient, NotHeld, Pin, VaClient
from membroker.errors import (
    AlreadyExists,
    BrokerBusy,
    BrokerError,
    BrokerRestarting,
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
    control socket; the broker runs the same methods either way.

    A broker that is busy handshaking other connections of this uid (BrokerBusy) is asked
    again, backing off from 5 ms to 200 ms, until `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return Session(
                name, runtime_dir, timeout=max(0.1, deadline - time.monotonic()), calls=calls
            )
        except BrokerBusy:
            if time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


__all__ = [
    "Access",
    "AccessRange",
    "AlreadyExists",
    "BrokerBusy",
    "BrokerError",
    "BrokerRestarting",
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
