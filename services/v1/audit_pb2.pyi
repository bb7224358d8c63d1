import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jitgate.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppendRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: AuditEvent
    def __init__(self, event: _Optional[_Union[AuditEvent, _Mapping]] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("index", "record_hash")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    index: int
    record_hash: bytes
    def __init__(self, index: _Optional[int] = ..., record_hash: _Optional[bytes] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("from_index",)
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    from_index: int
    def __init__(self, from_index: _Optional[int] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("index", "time", "caller", "canonical", "prev_hash", "record_hash", "event")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    CANONICAL_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    time: _timestamp_pb2.Timestamp
    caller: str
    canonical: bytes
    prev_hash: bytes
    record_hash: bytes
    event: AuditEvent
    def __init__(self, index: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., caller: _Optional[str] = ..., canonical: _Optional[bytes] = ..., prev_hash: _Optional[bytes] = ..., record_hash: _Optional[bytes] = ..., event: _Optional[_Union[AuditEvent, _Mapping]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("token_rejected", "decision", "revocation")
    TOKEN_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_FIELD_NUMBER: _ClassVar[int]
    token_rejected: TokenRejected
    decision: DecisionRecorded
    revocation: GrantRevoked
    def __init__(self, token_rejected: _Optional[_Union[TokenRejected, _Mapping]] = ..., decision: _Optional[_Union[DecisionRecorded, _Mapping]] = ..., revocation: _Optional[_Union[GrantRevoked, _Mapping]] = ...) -> None: ...

class TokenRejected(_message.Message):
    __slots__ = ("reason", "token_fingerprint", "claimed_subject", "claimed_issuer", "key_id", "edge")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_ISSUER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    token_fingerprint: str
    claimed_subject: str
    claimed_issuer: str
    key_id: str
    edge: _types_pb2.EdgeContext
    def __init__(self, reason: _Optional[str] = ..., token_fingerprint: _Optional[str] = ..., claimed_subject: _Optional[str] = ..., claimed_issuer: _Optional[str] = ..., key_id: _Optional[str] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...

class DecisionRecorded(_message.Message):
    __slots__ = ("connection", "requested_ttl_seconds", "request_reason", "identity", "allowed", "reason_code", "binding", "grant_id", "expires_at", "policy_version", "edge")
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_REASON_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    connection: str
    requested_ttl_seconds: int
    request_reason: str
    identity: _types_pb2.Identity
    allowed: bool
    reason_code: str
    binding: _types_pb2.Binding
    grant_id: str
    expires_at: _timestamp_pb2.Timestamp
    policy_version: str
    edge: _types_pb2.EdgeContext
    def __init__(self, connection: _Optional[str] = ..., requested_ttl_seconds: _Optional[int] = ..., request_reason: _Optional[str] = ..., identity: _Optional[_Union[_types_pb2.Identity, _Mapping]] = ..., allowed: _Optional[bool] = ..., reason_code: _Optional[str] = ..., binding: _Optional[_Union[_types_pb2.Binding, _Mapping]] = ..., grant_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy_version: _Optional[str] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...

class GrantRevoked(_message.Message):
    __slots__ = ("grant_id", "subject", "connection", "actor", "reason", "expires_at", "edge")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    subject: str
    connection: str
    actor: str
    reason: str
    expires_at: _timestamp_pb2.Timestamp
    edge: _types_pb2.EdgeContext
    def __init__(self, grant_id: _Optional[str] = ..., subject: _Optional[str] = ..., connection: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...
