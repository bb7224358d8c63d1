"""Errors become statuses in one place, and statuses from other services become errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from jitgate.common.errors import (
    InvalidArgument,
    JitgateError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from jitgate.common.status import DOMAIN, UNAUTHENTICATED_MESSAGE, from_rpc_error, to_status


def _details(status: grpc.Status) -> status_pb2.Status:
    [(key, value)] = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    parsed = status_pb2.Status()
    parsed.ParseFromString(value)
    return parsed


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailers


class _Error(grpc.RpcError):
    """A failed call as gRPC raises it."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:
        return self._status.trailing_metadata


def test_unauthenticated_says_nothing_about_the_check() -> None:
    status = to_status(Unauthenticated("audience", "aud was api://other"))
    assert status.code == grpc.StatusCode.UNAUTHENTICATED
    assert status.details == UNAUTHENTICATED_MESSAGE
    assert "aud" not in status.details
    assert not _details(status).details


def test_denial_carries_error_info_and_retry_info() -> None:
    status = to_status(
        PermissionDenied("NO_BINDING", "no binding", metadata={"connection": "c"}, retry_after=2.5)
    )
    assert status.code == grpc.StatusCode.PERMISSION_DENIED
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    packed = _details(status).details
    assert packed[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "NO_BINDING",
        DOMAIN,
        {"connection": "c"},
    )
    assert packed[1].Unpack(retry)
    assert retry.retry_delay.seconds == 2


def test_invalid_argument_names_the_field() -> None:
    status = to_status(InvalidArgument("connection", "is required"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert _details(status).details[0].Unpack(bad)
    assert bad.field_violations[0].field == "connection"


def test_unavailable_hides_the_dependency() -> None:
    status = to_status(Unavailable("audit", "connection refused on 10.0.0.7"))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "audit" not in status.details
    assert "10.0.0.7" not in status.details


def test_an_unknown_error_kind_is_internal_without_detail() -> None:
    status = to_status(JitgateError("secret detail"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (PermissionDenied("NO_BINDING", "no", retry_after=1.0), PermissionDenied),
        (InvalidArgument("ttl_seconds", "too big"), InvalidArgument),
        (NotFound("grant"), NotFound),
        (Unauthenticated("x"), Unauthenticated),
        (Unavailable("redis"), Unavailable),
    ],
)
def test_round_trip(error: JitgateError, kind: type[JitgateError]) -> None:
    back = from_rpc_error(_Error(to_status(error)), "dep")
    assert isinstance(back, kind)
    if isinstance(error, PermissionDenied):
        assert isinstance(back, PermissionDenied)
        assert (back.reason, back.retry_after) == ("NO_BINDING", 1.0)
    if isinstance(error, InvalidArgument):
        assert isinstance(back, InvalidArgument)
        assert back.field == "ttl_seconds"


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN],
)
def test_anything_else_fails_closed(code: grpc.StatusCode) -> None:
    assert isinstance(from_rpc_error(_Error(_Status(code, "x")), "dep"), Unavailable)


def test_a_denial_without_error_info_is_our_misconfiguration_and_fails_closed() -> None:
    # An allow-list refusing *our* certificate is not an answer about the agent.
    status = _Status(grpc.StatusCode.PERMISSION_DENIED, "caller not allowed")
    assert isinstance(from_rpc_error(_Error(status), "audit"), Unavailable)


def test_a_corrupt_details_trailer_is_ignored() -> None:
    trailer = (("grpc-status-details-bin", b"\xff\xff"),)
    status = _Status(grpc.StatusCode.PERMISSION_DENIED, "x", trailer)
    assert isinstance(from_rpc_error(_Error(status), "policy"), Unavailable)


def test_code_numbers_agree_with_grpc() -> None:
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] == code_pb2.UNAUTHENTICATED
