import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jitgate.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecideRequest(_message.Message):
    __slots__ = ("assertion", "connection", "ttl_seconds", "reason", "edge")
    ASSERTION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    assertion: str
    connection: str
    ttl_seconds: int
    reason: str
    edge: _types_pb2.EdgeContext
    def __init__(self, assertion: _Optional[str] = ..., connection: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., reason: _Optional[str] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("allowed", "reason_code", "binding", "grant_id", "issued_at", "expires_at", "grant_token", "connection", "connection_kind", "subject", "policy_version")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    GRANT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason_code: str
    binding: _types_pb2.Binding
    grant_id: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    grant_token: str
    connection: str
    connection_kind: str
    subject: str
    policy_version: str
    def __init__(self, allowed: _Optional[bool] = ..., reason_code: _Optional[str] = ..., binding: _Optional[_Union[_types_pb2.Binding, _Mapping]] = ..., grant_id: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grant_token: _Optional[str] = ..., connection: _Optional[str] = ..., connection_kind: _Optional[str] = ..., subject: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("assertion", "grant_id", "reason", "edge")
    ASSERTION_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    assertion: str
    grant_id: str
    reason: str
    edge: _types_pb2.EdgeContext
    def __init__(self, assertion: _Optional[str] = ..., grant_id: _Optional[str] = ..., reason: _Optional[str] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_at",)
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
