import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from jitgate.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyRequest(_message.Message):
    __slots__ = ("token", "edge")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    token: str
    edge: _types_pb2.EdgeContext
    def __init__(self, token: _Optional[str] = ..., edge: _Optional[_Union[_types_pb2.EdgeContext, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("identity", "assertion", "assertion_expires_at")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    identity: _types_pb2.Identity
    assertion: str
    assertion_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, identity: _Optional[_Union[_types_pb2.Identity, _Mapping]] = ..., assertion: _Optional[str] = ..., assertion_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
