"""The one place where jitgate errors become gRPC statuses, and back.

Statuses carry google.rpc details (ErrorInfo, BadRequest, RetryInfo) so an
agent can act on a denial without parsing prose.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from jitgate.common.errors import (
    InvalidArgument,
    JitgateError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

DOMAIN = "jitgate"
"""The google.rpc.ErrorInfo domain of every reason jitgate sends."""

UNAUTHENTICATED_MESSAGE = "authentication failed"
UNAVAILABLE_MESSAGE = "jitgate cannot complete this request now; retry later"
_DETAILS_KEY = "grpc-status-details-bin"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]  # any protobuf message
    return packed


def _retry(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def to_status(exc: JitgateError) -> grpc.Status:
    """Return the status a caller sees for exc; reasons meant for operators stay out."""
    details: list[any_pb2.Any] = []
    if isinstance(exc, Unauthenticated):
        code, message = code_pb2.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
    elif isinstance(exc, PermissionDenied):
        code, message = code_pb2.PERMISSION_DENIED, exc.message
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
        details.append(_pack(info))
        if exc.retry_after is not None:
            details.append(_retry(exc.retry_after))
    elif isinstance(exc, InvalidArgument):
        code, message = code_pb2.INVALID_ARGUMENT, f"invalid {exc.field}: {exc.description}"
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    elif isinstance(exc, NotFound):
        code, message = code_pb2.NOT_FOUND, f"{exc.what} not found"
    elif isinstance(exc, Unavailable):
        code, message = code_pb2.UNAVAILABLE, UNAVAILABLE_MESSAGE
        details.append(_retry(1.0))
    else:
        code, message = code_pb2.INTERNAL, "internal error"
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def _details(err: grpc.RpcError) -> status_pb2.Status | None:
    trailers: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status()
            try:
                parsed.ParseFromString(value)
            except Exception:  # a corrupt trailer is treated as no details
                return None
            return parsed
    return None


def from_rpc_error(err: grpc.RpcError, dependency: str) -> JitgateError:
    """Translate a failed call to another jitgate service into our own error.

    Anything that is not a clean answer from the dependency (it is down, slow,
    refused our identity, or failed) becomes Unavailable: fail closed.
    """
    call: Any = err  # every RpcError raised by a call is also a grpc.Call
    code: grpc.StatusCode = call.code()
    text: str = call.details() or ""
    status = _details(err)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated("upstream", f"{dependency}: {text}")
    if code == grpc.StatusCode.PERMISSION_DENIED and status is not None:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        reason, metadata, retry_after = "", {}, None
        for detail in status.details:
            if detail.Unpack(info) and info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(retry):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        if reason:
            return PermissionDenied(reason, text, metadata=metadata, retry_after=retry_after)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest()
        for detail in status.details if status is not None else ():
            if detail.Unpack(bad) and bad.field_violations:
                violation = bad.field_violations[0]
                return InvalidArgument(violation.field, violation.description)
        return InvalidArgument("request", text)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(text.removesuffix(" not found") or "resource")
    return Unavailable(dependency, f"{code.name}: {text}")
