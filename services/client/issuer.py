"""A small synchronous client for the Issuer API, with errors an agent can act on."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from jitgate import __version__
from jitgate.common import errors, wire
from jitgate.common.status import from_rpc_error
from jitgate.v1 import issuer_pb2, issuer_pb2_grpc

TokenSource = Callable[[], str]


class GrantError(Exception):
    """Root of the errors IssuerClient raises."""


class Denied(GrantError):
    """Policy said no; reason is machine-readable (e.g. NO_BINDING)."""

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class Unauthenticated(GrantError):
    """The access token was rejected; get a fresh one."""


class Unavailable(GrantError):
    """jitgate could not decide now (a part of it is down or slow); retry later."""


class InvalidRequest(GrantError):
    """The request was malformed; field names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(GrantError):
    """No such grant among the caller's live grants."""


@dataclass(frozen=True, kw_only=True)
class Grant:
    """A grant as the issuer returned it; token is empty except from request_grant."""

    grant_id: str
    connection: str
    connection_kind: str
    subject: str
    issued_at: datetime.datetime
    expires_at: datetime.datetime
    proxy_endpoint: str
    token: str = field(default="", repr=False)
    namespace: str = ""
    """For a kubernetes connection, the one namespace it reaches."""

    def as_dict(self) -> dict[str, Any]:
        """Return the grant as JSON-ready data (the token only if present)."""
        out: dict[str, Any] = {
            "grant_id": self.grant_id,
            "connection": self.connection,
            "connection_kind": self.connection_kind,
            "subject": self.subject,
            "issued_at": self.issued_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "proxy_endpoint": self.proxy_endpoint,
        }
        if self.namespace:
            out["namespace"] = self.namespace
        if self.token:
            out["token"] = self.token
        return out


def _time(stamp: Timestamp) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(wire.seconds(stamp), tz=datetime.UTC)


def _grant(message: issuer_pb2.Grant) -> Grant:
    return Grant(
        grant_id=message.grant_id,
        connection=message.connection,
        connection_kind=message.connection_kind,
        subject=message.subject,
        issued_at=_time(message.issued_at),
        expires_at=_time(message.expires_at),
        proxy_endpoint=message.proxy_endpoint,
        token=message.token,
        namespace=message.namespace,
    )


def _error(exc: grpc.RpcError) -> GrantError:
    """The SDK's error for a failed call; status details are read by jitgate.common.status."""
    call: Any = exc
    code, text = call.code(), call.details() or ""
    error = from_rpc_error(exc, "issuer")
    if isinstance(error, errors.PermissionDenied):
        return Denied(error.reason, text, error.retry_after)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Denied("DENIED", text, None)
    if isinstance(error, errors.Unauthenticated):
        return Unauthenticated(text)
    if isinstance(error, errors.InvalidArgument):
        return InvalidRequest(error.field, text)
    if isinstance(error, errors.NotFound):
        return NotFound(text)
    return Unavailable(f"{code.name}: {text}")


class IssuerClient:
    """Talks to the issuer over TLS, sending the agent's access token with every call."""

    def __init__(
        self,
        target: str,
        *,
        token: str | TokenSource,
        ca_file: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        roots = ca_file.read_bytes() if ca_file is not None else None
        self._channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=roots),
            options=[("grpc.primary_user_agent", f"jitgate-client/{__version__}")],
        )
        self._stub = issuer_pb2_grpc.IssuerStub(self._channel)
        self._token: TokenSource = token if callable(token) else (lambda: token)
        self._timeout = timeout

    def _metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self._token()}"),)

    def request_grant(self, connection: str, *, ttl_seconds: int = 0, reason: str = "") -> Grant:
        """Ask for a grant to connection; ttl_seconds 0 asks for the binding's maximum."""
        request = issuer_pb2.RequestGrantRequest(
            connection=connection, ttl_seconds=ttl_seconds, reason=reason
        )
        try:
            reply = self._stub.RequestGrant(
                request, timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _grant(reply)

    def get_grant(self, grant_id: str) -> Grant:
        """Return one of our live grants (without its token)."""
        try:
            reply = self._stub.GetGrant(
                issuer_pb2.GetGrantRequest(grant_id=grant_id),
                timeout=self._timeout,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _grant(reply)

    def list_grants(self) -> list[Grant]:
        """Return our live grants (without their tokens)."""
        try:
            reply = self._stub.ListGrants(
                issuer_pb2.ListGrantsRequest(), timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [_grant(g) for g in reply.grants]

    def revoke_grant(self, grant_id: str, *, reason: str = "") -> datetime.datetime:
        """Revoke one of our grants; return when it was revoked."""
        try:
            reply = self._stub.RevokeGrant(
                issuer_pb2.RevokeGrantRequest(grant_id=grant_id, reason=reason),
                timeout=self._timeout,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _time(reply.revoked_at)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> IssuerClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
