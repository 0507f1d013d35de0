"""The daemon's domain errors; the servicer edge maps each class to one gRPC status code.

    BrokerFault
    ├── BadRequest          malformed or out-of-range arguments      -> INVALID_ARGUMENT
    ├── UnknownObject       no such space, pin, client               -> NOT_FOUND
    ├── NameInUse           client name held by a live session       -> ALREADY_EXISTS
    ├── NotAllowed          not the owner, policy                    -> PERMISSION_DENIED
    ├── NoSession           missing or unknown session token         -> UNAUTHENTICATED
    ├── LimitReached        a configured limit (named)               -> RESOURCE_EXHAUSTED
    ├── WrongState          private range, not granted, not attached -> FAILED_PRECONDITION
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


class FeatureMissing(BrokerFault):
    pass
