from membroker.v1 import session_pb2 as _session_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKING_UNSPECIFIED: _ClassVar[Backing]
    BACKING_MEMFD: _ClassVar[Backing]
    BACKING_GUEST_MEMFD: _ClassVar[Backing]
    BACKING_MEMFD_HUGETLB: _ClassVar[Backing]

class Attribute(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTRIBUTE_UNSPECIFIED: _ClassVar[Attribute]
    ATTRIBUTE_SHARED: _ClassVar[Attribute]
    ATTRIBUTE_PRIVATE: _ClassVar[Attribute]

class OnPinned(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_PINNED_DEFAULT: _ClassVar[OnPinned]
    ON_PINNED_FAIL: _ClassVar[OnPinned]
    ON_PINNED_FENCE: _ClassVar[OnPinned]

class AttachKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTACH_KIND_UNSPECIFIED: _ClassVar[AttachKind]
    ATTACH_KIND_VA: _ClassVar[AttachKind]
    ATTACH_KIND_FD: _ClassVar[AttachKind]

class VaMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VA_MODE_UNSPECIFIED: _ClassVar[VaMode]
    VA_MODE_SEALED: _ClassVar[VaMode]
    VA_MODE_COOPERATIVE: _ClassVar[VaMode]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ACKED: _ClassVar[Outcome]
    OUTCOME_FENCED: _ClassVar[Outcome]
    OUTCOME_GONE: _ClassVar[Outcome]
    OUTCOME_UNVERIFIED: _ClassVar[Outcome]
    OUTCOME_ENFORCED: _ClassVar[Outcome]

class FenceResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FENCE_RESULT_UNSPECIFIED: _ClassVar[FenceResult]
    FENCE_RESULT_DISCONNECTED: _ClassVar[FenceResult]
    FENCE_RESULT_KILLED: _ClassVar[FenceResult]
    FENCE_RESULT_STILL_MAPPED: _ClassVar[FenceResult]
    FENCE_RESULT_EXITED: _ClassVar[FenceResult]
BACKING_UNSPECIFIED: Backing
BACKING_MEMFD: Backing
BACKING_GUEST_MEMFD: Backing
BACKING_MEMFD_HUGETLB: Backing
ATTRIBUTE_UNSPECIFIED: Attribute
ATTRIBUTE_SHARED: Attribute
ATTRIBUTE_PRIVATE: Attribute
ON_PINNED_DEFAULT: OnPinned
ON_PINNED_FAIL: OnPinned
ON_PINNED_FENCE: OnPinned
ATTACH_KIND_UNSPECIFIED: AttachKind
ATTACH_KIND_VA: AttachKind
ATTACH_KIND_FD: AttachKind
VA_MODE_UNSPECIFIED: VaMode
VA_MODE_SEALED: VaMode
VA_MODE_COOPERATIVE: VaMode
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ACKED: Outcome
OUTCOME_FENCED: Outcome
OUTCOME_GONE: Outcome
OUTCOME_UNVERIFIED: Outcome
OUTCOME_ENFORCED: Outcome
FENCE_RESULT_UNSPECIFIED: FenceResult
FENCE_RESULT_DISCONNECTED: FenceResult
FENCE_RESULT_KILLED: FenceResult
FENCE_RESULT_STILL_MAPPED: FenceResult
FENCE_RESULT_EXITED: FenceResult

class Region(_message.Message):
    __slots__ = ("gpa", "offset", "size")
    GPA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    gpa: int
    offset: int
    size: int
    def __init__(self, gpa: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class Space(_message.Message):
    __slots__ = ("space_id", "name", "size", "backing", "owner", "ephemeral", "seq", "regions", "shared_bytes", "page_size", "imported", "attachments", "grant_clients", "created_unix")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    GRANT_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    name: str
    size: int
    backing: Backing
    owner: str
    ephemeral: bool
    seq: int
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    shared_bytes: int
    page_size: int
    imported: bool
    attachments: int
    grant_clients: int
    created_unix: float
    def __init__(self, space_id: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., backing: _Optional[_Union[Backing, str]] = ..., owner: _Optional[str] = ..., ephemeral: _Optional[bool] = ..., seq: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., shared_bytes: _Optional[int] = ..., page_size: _Optional[int] = ..., imported: _Optional[bool] = ..., attachments: _Optional[int] = ..., grant_clients: _Optional[int] = ..., created_unix: _Optional[float] = ...) -> None: ...

class CreateSpaceRequest(_message.Message):
    __slots__ = ("size", "backing", "name", "ephemeral", "regions", "huge_page_size")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    HUGE_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    backing: Backing
    name: str
    ephemeral: bool
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    huge_page_size: int
    def __init__(self, size: _Optional[int] = ..., backing: _Optional[_Union[Backing, str]] = ..., name: _Optional[str] = ..., ephemeral: _Optional[bool] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., huge_page_size: _Optional[int] = ...) -> None: ...

class ImportSpaceRequest(_message.Message):
    __slots__ = ("fd_tag", "name", "ephemeral", "regions", "expected_size")
    FD_TAG_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    fd_tag: int
    name: str
    ephemeral: bool
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    expected_size: int
    def __init__(self, fd_tag: _Optional[int] = ..., name: _Optional[str] = ..., ephemeral: _Optional[bool] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., expected_size: _Optional[int] = ...) -> None: ...

class CreateSpaceResponse(_message.Message):
    __slots__ = ("space", "fd_tag")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    FD_TAG_FIELD_NUMBER: _ClassVar[int]
    space: Space
    fd_tag: int
    def __init__(self, space: _Optional[_Union[Space, _Mapping]] = ..., fd_tag: _Optional[int] = ...) -> None: ...

class DeleteSpaceRequest(_message.Message):
    __slots__ = ("space_id", "on_pinned")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    ON_PINNED_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    on_pinned: OnPinned
    def __init__(self, space_id: _Optional[str] = ..., on_pinned: _Optional[_Union[OnPinned, str]] = ...) -> None: ...

class GetSpaceRequest(_message.Message):
    __slots__ = ("space_id",)
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    def __init__(self, space_id: _Optional[str] = ...) -> None: ...

class ListSpacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSpacesResponse(_message.Message):
    __slots__ = ("spaces",)
    SPACES_FIELD_NUMBER: _ClassVar[int]
    spaces: _containers.RepeatedCompositeFieldContainer[Space]
    def __init__(self, spaces: _Optional[_Iterable[_Union[Space, _Mapping]]] = ...) -> None: ...

class SetAttributesRequest(_message.Message):
    __slots__ = ("space_id", "range", "attribute", "on_pinned", "ranges")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    ON_PINNED_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    range: _session_pb2.Range
    attribute: Attribute
    on_pinned: OnPinned
    ranges: _containers.RepeatedCompositeFieldContainer[_session_pb2.Range]
    def __init__(self, space_id: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.Range, _Mapping]] = ..., attribute: _Optional[_Union[Attribute, str]] = ..., on_pinned: _Optional[_Union[OnPinned, str]] = ..., ranges: _Optional[_Iterable[_Union[_session_pb2.Range, _Mapping]]] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("space_id", "client", "range", "access", "on_pinned", "ranges")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    ON_PINNED_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    client: str
    range: _session_pb2.Range
    access: _session_pb2.Access
    on_pinned: OnPinned
    ranges: _containers.RepeatedCompositeFieldContainer[_session_pb2.Range]
    def __init__(self, space_id: _Optional[str] = ..., client: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.Range, _Mapping]] = ..., access: _Optional[_Union[_session_pb2.Access, str]] = ..., on_pinned: _Optional[_Union[OnPinned, str]] = ..., ranges: _Optional[_Iterable[_Union[_session_pb2.Range, _Mapping]]] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("seq", "notified")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    notified: int
    def __init__(self, seq: _Optional[int] = ..., notified: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("space_id", "client", "range", "on_pinned", "ranges")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    ON_PINNED_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    client: str
    range: _session_pb2.Range
    on_pinned: OnPinned
    ranges: _containers.RepeatedCompositeFieldContainer[_session_pb2.Range]
    def __init__(self, space_id: _Optional[str] = ..., client: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.Range, _Mapping]] = ..., on_pinned: _Optional[_Union[OnPinned, str]] = ..., ranges: _Optional[_Iterable[_Union[_session_pb2.Range, _Mapping]]] = ...) -> None: ...

class ClientOutcome(_message.Message):
    __slots__ = ("client", "session_id", "pid", "outcome", "latency_us", "reason", "fence", "withdrawn", "in_flight", "isolation")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    client: str
    session_id: str
    pid: int
    outcome: Outcome
    latency_us: int
    reason: str
    fence: FenceResult
    withdrawn: _containers.RepeatedCompositeFieldContainer[_session_pb2.Range]
    in_flight: _containers.RepeatedCompositeFieldContainer[_session_pb2.Range]
    isolation: str
    def __init__(self, client: _Optional[str] = ..., session_id: _Optional[str] = ..., pid: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., latency_us: _Optional[int] = ..., reason: _Optional[str] = ..., fence: _Optional[_Union[FenceResult, str]] = ..., withdrawn: _Optional[_Iterable[_Union[_session_pb2.Range, _Mapping]]] = ..., in_flight: _Optional[_Iterable[_Union[_session_pb2.Range, _Mapping]]] = ..., isolation: _Optional[str] = ...) -> None: ...

class RevocationReport(_message.Message):
    __slots__ = ("space_id", "seq", "clients", "duration_us", "revoked_bytes", "cause", "caller_gone")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    CALLER_GONE_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    seq: int
    clients: _containers.RepeatedCompositeFieldContainer[ClientOutcome]
    duration_us: int
    revoked_bytes: int
    cause: str
    caller_gone: bool
    def __init__(self, space_id: _Optional[str] = ..., seq: _Optional[int] = ..., clients: _Optional[_Iterable[_Union[ClientOutcome, _Mapping]]] = ..., duration_us: _Optional[int] = ..., revoked_bytes: _Optional[int] = ..., cause: _Optional[str] = ..., caller_gone: _Optional[bool] = ...) -> None: ...

class ListRevocationsRequest(_message.Message):
    __slots__ = ("space_id", "after_seq")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    after_seq: int
    def __init__(self, space_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ListRevocationsResponse(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[RevocationReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[RevocationReport, _Mapping]]] = ...) -> None: ...

class GrantRecord(_message.Message):
    __slots__ = ("client", "range")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    client: str
    range: _session_pb2.AccessRange
    def __init__(self, client: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.AccessRange, _Mapping]] = ...) -> None: ...

class ListGrantsRequest(_message.Message):
    __slots__ = ("space_id", "client", "start_client", "start_offset", "limit")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    START_CLIENT_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    client: str
    start_client: str
    start_offset: int
    limit: int
    def __init__(self, space_id: _Optional[str] = ..., client: _Optional[str] = ..., start_client: _Optional[str] = ..., start_offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListGrantsResponse(_message.Message):
    __slots__ = ("grants", "more", "next_client", "next_offset")
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_CLIENT_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[GrantRecord]
    more: bool
    next_client: str
    next_offset: int
    def __init__(self, grants: _Optional[_Iterable[_Union[GrantRecord, _Mapping]]] = ..., more: _Optional[bool] = ..., next_client: _Optional[str] = ..., next_offset: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("space_id", "kind", "va_mode", "resume", "address", "writable")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VA_MODE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    kind: AttachKind
    va_mode: VaMode
    resume: bool
    address: int
    writable: bool
    def __init__(self, space_id: _Optional[str] = ..., kind: _Optional[_Union[AttachKind, str]] = ..., va_mode: _Optional[_Union[VaMode, str]] = ..., resume: _Optional[bool] = ..., address: _Optional[int] = ..., writable: _Optional[bool] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("space", "fd_tag", "seq", "ranges", "ranges_on_session", "va_mode", "writable")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    FD_TAG_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    RANGES_ON_SESSION_FIELD_NUMBER: _ClassVar[int]
    VA_MODE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    space: Space
    fd_tag: int
    seq: int
    ranges: _containers.RepeatedCompositeFieldContainer[_session_pb2.AccessRange]
    ranges_on_session: bool
    va_mode: VaMode
    writable: bool
    def __init__(self, space: _Optional[_Union[Space, _Mapping]] = ..., fd_tag: _Optional[int] = ..., seq: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[_session_pb2.AccessRange, _Mapping]]] = ..., ranges_on_session: _Optional[bool] = ..., va_mode: _Optional[_Union[VaMode, str]] = ..., writable: _Optional[bool] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("space_id",)
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    def __init__(self, space_id: _Optional[str] = ...) -> None: ...

class DetachResponse(_message.Message):
    __slots__ = ("released_pins",)
    RELEASED_PINS_FIELD_NUMBER: _ClassVar[int]
    released_pins: int
    def __init__(self, released_pins: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("space_id", "range", "write")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    range: _session_pb2.Range
    write: bool
    def __init__(self, space_id: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.Range, _Mapping]] = ..., write: _Optional[bool] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pin_id", "seq")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    pin_id: int
    seq: int
    def __init__(self, pin_id: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("space_id", "pin_id")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    pin_id: int
    def __init__(self, space_id: _Optional[str] = ..., pin_id: _Optional[int] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PinRecord(_message.Message):
    __slots__ = ("pin_id", "client", "session_id", "range", "write", "age_seconds", "pid")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    pin_id: int
    client: str
    session_id: str
    range: _session_pb2.Range
    write: bool
    age_seconds: float
    pid: int
    def __init__(self, pin_id: _Optional[int] = ..., client: _Optional[str] = ..., session_id: _Optional[str] = ..., range: _Optional[_Union[_session_pb2.Range, _Mapping]] = ..., write: _Optional[bool] = ..., age_seconds: _Optional[float] = ..., pid: _Optional[int] = ...) -> None: ...

class ListPinsRequest(_message.Message):
    __slots__ = ("space_id",)
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    def __init__(self, space_id: _Optional[str] = ...) -> None: ...

class ListPinsResponse(_message.Message):
    __slots__ = ("pins",)
    PINS_FIELD_NUMBER: _ClassVar[int]
    pins: _containers.RepeatedCompositeFieldContainer[PinRecord]
    def __init__(self, pins: _Optional[_Iterable[_Union[PinRecord, _Mapping]]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "client", "pid", "uid", "gid", "attached_spaces", "owned_spaces", "pins", "age_seconds", "sealed_spaces", "isolation")
    class IsolationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_SPACES_FIELD_NUMBER: _ClassVar[int]
    OWNED_SPACES_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEALED_SPACES_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client: str
    pid: int
    uid: int
    gid: int
    attached_spaces: _containers.RepeatedScalarFieldContainer[str]
    owned_spaces: _containers.RepeatedScalarFieldContainer[str]
    pins: int
    age_seconds: float
    sealed_spaces: _containers.RepeatedScalarFieldContainer[str]
    isolation: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., client: _Optional[str] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., attached_spaces: _Optional[_Iterable[str]] = ..., owned_spaces: _Optional[_Iterable[str]] = ..., pins: _Optional[int] = ..., age_seconds: _Optional[float] = ..., sealed_spaces: _Optional[_Iterable[str]] = ..., isolation: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("sessions", "spaces", "bytes_total", "bytes_shared", "grants", "pins", "revocations_total", "fenced_total", "open_fds", "metrics_url", "version", "pid", "uptime_seconds", "unverified_total")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SPACES_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_SHARED_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FENCED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNVERIFIED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    spaces: int
    bytes_total: int
    bytes_shared: int
    grants: int
    pins: int
    revocations_total: int
    fenced_total: int
    open_fds: int
    metrics_url: str
    version: str
    pid: int
    uptime_seconds: float
    unverified_total: int
    def __init__(self, sessions: _Optional[int] = ..., spaces: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_shared: _Optional[int] = ..., grants: _Optional[int] = ..., pins: _Optional[int] = ..., revocations_total: _Optional[int] = ..., fenced_total: _Optional[int] = ..., open_fds: _Optional[int] = ..., metrics_url: _Optional[str] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., unverified_total: _Optional[int] = ...) -> None: ...

class UpgradeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpgradeResponse(_message.Message):
    __slots__ = ("pid", "argv")
    PID_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    pid: int
    argv: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pid: _Optional[int] = ..., argv: _Optional[_Iterable[str]] = ...) -> None: ...
