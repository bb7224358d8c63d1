import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Identity(_message.Message):
    __slots__ = ("subject", "client_id", "groups", "token_expires_at", "issuer", "token_id")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    subject: str
    client_id: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    token_expires_at: _timestamp_pb2.Timestamp
    issuer: str
    token_id: str
    def __init__(self, subject: _Optional[str] = ..., client_id: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., token_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issuer: _Optional[str] = ..., token_id: _Optional[str] = ...) -> None: ...

class Binding(_message.Message):
    __slots__ = ("group", "connection", "max_ttl_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    connection: str
    max_ttl_seconds: int
    def __init__(self, group: _Optional[str] = ..., connection: _Optional[str] = ..., max_ttl_seconds: _Optional[int] = ...) -> None: ...

class EdgeContext(_message.Message):
    __slots__ = ("peer", "rpc", "user_agent")
    PEER_FIELD_NUMBER: _ClassVar[int]
    RPC_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    peer: str
    rpc: str
    user_agent: str
    def __init__(self, peer: _Optional[str] = ..., rpc: _Optional[str] = ..., user_agent: _Optional[str] = ...) -> None: ...
