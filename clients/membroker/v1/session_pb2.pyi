from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Access(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_NONE: _ClassVar[Access]
    ACCESS_RO: _ClassVar[Access]
    ACCESS_RW: _ClassVar[Access]
ACCESS_NONE: Access
ACCESS_RO: Access
ACCESS_RW: Access

class Range(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class AccessRange(_message.Message):
    __slots__ = ("offset", "length", "access")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    access: Access
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., access: _Optional[_Union[Access, str]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "client_name", "resume_token")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_name: str
    resume_token: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_name: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "token", "protocol_version", "max_frame_bytes", "broker_pid", "page_size", "resume_token", "resumed", "call_channels")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    BROKER_PID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    CALL_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    protocol_version: int
    max_frame_bytes: int
    broker_pid: int
    page_size: int
    resume_token: str
    resumed: bool
    call_channels: bool
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., protocol_version: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., broker_pid: _Optional[int] = ..., page_size: _Optional[int] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ..., call_channels: _Optional[bool] = ...) -> None: ...

class FdOffer(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: int
    def __init__(self, tag: _Optional[int] = ...) -> None: ...

class FdDelivery(_message.Message):
    __slots__ = ("tag", "space_id", "upgrade")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    UPGRADE_FIELD_NUMBER: _ClassVar[int]
    tag: int
    space_id: str
    upgrade: bool
    def __init__(self, tag: _Optional[int] = ..., space_id: _Optional[str] = ..., upgrade: _Optional[bool] = ...) -> None: ...

class AccessUpdate(_message.Message):
    __slots__ = ("space_id", "seq", "ranges", "more", "snapshot")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    seq: int
    ranges: _containers.RepeatedCompositeFieldContainer[AccessRange]
    more: bool
    snapshot: bool
    def __init__(self, space_id: _Optional[str] = ..., seq: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[AccessRange, _Mapping]]] = ..., more: _Optional[bool] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class Revoke(_message.Message):
    __slots__ = ("space_id", "seq", "ranges", "space_deleted", "deadline_ms", "more")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    SPACE_DELETED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    seq: int
    ranges: _containers.RepeatedCompositeFieldContainer[AccessRange]
    space_deleted: bool
    deadline_ms: int
    more: bool
    def __init__(self, space_id: _Optional[str] = ..., seq: _Optional[int] = ..., ranges: _Optional[_Iterable[_Union[AccessRange, _Mapping]]] = ..., space_deleted: _Optional[bool] = ..., deadline_ms: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class RevokeAck(_message.Message):
    __slots__ = ("space_id", "seq", "withdrawn", "in_flight")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    seq: int
    withdrawn: _containers.RepeatedCompositeFieldContainer[Range]
    in_flight: _containers.RepeatedCompositeFieldContainer[Range]
    def __init__(self, space_id: _Optional[str] = ..., seq: _Optional[int] = ..., withdrawn: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., in_flight: _Optional[_Iterable[_Union[Range, _Mapping]]] = ...) -> None: ...

class RevokeRefused(_message.Message):
    __slots__ = ("space_id", "seq", "reason")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    seq: int
    reason: str
    def __init__(self, space_id: _Optional[str] = ..., seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason", "fenced", "restarting")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    RESTARTING_FIELD_NUMBER: _ClassVar[int]
    reason: str
    fenced: bool
    restarting: bool
    def __init__(self, reason: _Optional[str] = ..., fenced: _Optional[bool] = ..., restarting: _Optional[bool] = ...) -> None: ...

class Mapped(_message.Message):
    __slots__ = ("space_id", "address", "length")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    address: int
    length: int
    def __init__(self, space_id: _Optional[str] = ..., address: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Sealed(_message.Message):
    __slots__ = ("space_id", "address", "length")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    address: int
    length: int
    def __init__(self, space_id: _Optional[str] = ..., address: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class SealedResult(_message.Message):
    __slots__ = ("space_id", "error")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    error: str
    def __init__(self, space_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class Call(_message.Message):
    __slots__ = ("id", "method", "body")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    id: int
    method: str
    body: bytes
    def __init__(self, id: _Optional[int] = ..., method: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class CallResult(_message.Message):
    __slots__ = ("id", "body", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    body: bytes
    code: int
    message: str
    def __init__(self, id: _Optional[int] = ..., body: _Optional[bytes] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CallCancelled(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class CallChannel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Isolation(_message.Message):
    __slots__ = ("space_id", "logical_only")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    logical_only: str
    def __init__(self, space_id: _Optional[str] = ..., logical_only: _Optional[str] = ...) -> None: ...

class ReleasePins(_message.Message):
    __slots__ = ("space_id", "ranges", "deadline_ms")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    ranges: _containers.RepeatedCompositeFieldContainer[Range]
    deadline_ms: int
    def __init__(self, space_id: _Optional[str] = ..., ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("hello", "welcome", "fd_offer", "fd_delivery", "access_update", "revoke", "revoke_ack", "ping", "pong", "error", "goodbye", "mapped", "release_pins", "revoke_refused", "sealed", "sealed_result", "call", "call_result", "call_cancelled", "isolation", "call_channel")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    FD_OFFER_FIELD_NUMBER: _ClassVar[int]
    FD_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    ACCESS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    REVOKE_ACK_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    MAPPED_FIELD_NUMBER: _ClassVar[int]
    RELEASE_PINS_FIELD_NUMBER: _ClassVar[int]
    REVOKE_REFUSED_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    SEALED_RESULT_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CALL_RESULT_FIELD_NUMBER: _ClassVar[int]
    CALL_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    CALL_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    welcome: Welcome
    fd_offer: FdOffer
    fd_delivery: FdDelivery
    access_update: AccessUpdate
    revoke: Revoke
    revoke_ack: RevokeAck
    ping: Ping
    pong: Pong
    error: Error
    goodbye: Goodbye
    mapped: Mapped
    release_pins: ReleasePins
    revoke_refused: RevokeRefused
    sealed: Sealed
    sealed_result: SealedResult
    call: Call
    call_result: CallResult
    call_cancelled: CallCancelled
    isolation: Isolation
    call_channel: CallChannel
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., fd_offer: _Optional[_Union[FdOffer, _Mapping]] = ..., fd_delivery: _Optional[_Union[FdDelivery, _Mapping]] = ..., access_update: _Optional[_Union[AccessUpdate, _Mapping]] = ..., revoke: _Optional[_Union[Revoke, _Mapping]] = ..., revoke_ack: _Optional[_Union[RevokeAck, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., mapped: _Optional[_Union[Mapped, _Mapping]] = ..., release_pins: _Optional[_Union[ReleasePins, _Mapping]] = ..., revoke_refused: _Optional[_Union[RevokeRefused, _Mapping]] = ..., sealed: _Optional[_Union[Sealed, _Mapping]] = ..., sealed_result: _Optional[_Union[SealedResult, _Mapping]] = ..., call: _Optional[_Union[Call, _Mapping]] = ..., call_result: _Optional[_Union[CallResult, _Mapping]] = ..., call_cancelled: _Optional[_Union[CallCancelled, _Mapping]] = ..., isolation: _Optional[_Union[Isolation, _Mapping]] = ..., call_channel: _Optional[_Union[CallChannel, _Mapping]] = ...) -> None: ...
