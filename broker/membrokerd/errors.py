"""The daemon's domain errors; the servicer edge maps each class to one gRPC status code.

    BrokerFault
    ├── BadRequest          malformed or out-of-range arguments      -> INVALID_ARGUMENT
    ├── UnknownObject       no such space, pin, client               -> NOT_FOUND
    ├── NameInUse           client name held by a live session       -> ALREADY_EXISTS
    ├── NotAllowed          not the owner, policy                    -> PERMISSION_DENIED
    ├── NoSession           missing or unknown session token         -> UNAUTHENTICATED
    ├── LimitReached        a configured limit (named)               -> RESOURCE_EXHAUSTED
    ├── WrongState          private range, not granted, not attached -> FAILED_PRECONDITION
    │   └── RangePinned     a pin outlived the revoke deadline        -> FAILED_PRECONDITION
    └── FeatureMissing      the kernel lacks what the call needs     -> UNIMPLEMENTED

The access table's own errors (membrokerd.access.AccessError tree) are mapped at the same edge.
"""

from __future__ import annotations


class BrokerFault(Exception):
    """Root of the errors a request can cause; the message is sent to the caller."""


class BadRequest(BrokerFault):
    pass


class UnknownObject(BrokerFault):
    pass


class NameInUse(BrokerFault):
    pass


class NotAllowed(BrokerFault):
    pass


class NoSession(BrokerFault):
    pass


class LimitReached(BrokerFault):
    def __init__(self, limit: str, value: int, message: str) -> None:
        super().__init__(f"{message} (limit {limit} = {value})")
        self.limit = limit
        self.value = value


class WrongState(BrokerFault):
    pass


class RangePinned(WrongState):
    """A revocation met a pin that outlived the deadline (on_pinned = fail): nothing changed."""

    def __init__(
        self, client: str, session_id: str, pid: int, offset: int, pin_id: int, deadline_ms: int
    ) -> None:
        super().__init__(
            f"offset {offset:#x} is pinned by client {client!r} (session {session_id}, pid "
            f"{pid}, pin {pin_id}) and was not unpinned within {deadline_ms} ms; nothing changed"
        )
        self.client = client
        self.session_id = session_id
        self.pid = pid
        self.offset = offset
        self.pin_id = pin_id


class FeatureMissing(BrokerFault):
    pass
