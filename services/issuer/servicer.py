"""The Issuer gRPC servicer: authenticate through the verifier, decide through policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from jitgate.common import telemetry, validate, wire
from jitgate.common.clock import Clock
from jitgate.common.errors import (
    JitgateError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from jitgate.common.grants import GrantRecord
from jitgate.common.jws import MAX_TOKEN_BYTES
from jitgate.common.rpc import ServicerContext
from jitgate.common.status import from_rpc_error
from jitgate.issuer.store import GrantStore
from jitgate.v1 import (
    issuer_pb2,
    issuer_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    types_pb2,
    verifier_pb2,
    verifier_pb2_grpc,
)

log = logging.getLogger(__name__)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """Return the token in the one `authorization: Bearer` header (RFC 6750, section 2.1)."""
    values = [v for k, v in metadata if k == "authorization"]
    if len(values) != 1:
        raise Unauthenticated("bearer", f"{len(values)} authorization headers")
    value = values[0]
    if not isinstance(value, str):
        raise Unauthenticated("bearer", "binary authorization header")
    scheme, _, token = value.partition(" ")
    # The auth-scheme is case-insensitive (RFC 9110, section 11.1).
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("bearer", "not a Bearer credential")
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("size", f"{len(token)} bytes")
    return token


class _Budget:
    """One deadline for the whole request, shared by the calls it makes."""

    def __init__(self, seconds: float, context: ServicerContext) -> None:
        remaining: float | None = context.time_remaining()  # None: the agent set no deadline
        if remaining is not None:
            seconds = min(seconds, remaining)
        self._end = asyncio.get_running_loop().time() + seconds

    def left(self, dependency: str) -> float:
        """Seconds left for the next call, or Unavailable when none are."""
        left = self._end - asyncio.get_running_loop().time()
        if left <= 0:
            raise Unavailable(dependency, "request deadline spent before the call")
        return left


@dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    """What the issuer tells agents and how long it waits for its dependencies."""

    proxy_endpoint: str
    """Where agents redeem PostgreSQL grants."""
    deadline: float
    proxy_endpoints: Mapping[str, str] = field(default_factory=dict)
    """Per connection kind ("ssh", "kubernetes"), where agents redeem; else proxy_endpoint."""

    def endpoint(self, kind: str) -> str:
        """Where an agent redeems a grant for a connection of kind."""
        return self.proxy_endpoints.get(kind) or self.proxy_endpoint


class IssuerServicer(issuer_pb2_grpc.IssuerServicer):
    """Thin: every decision is the verifier's and the policy service's, never the issuer's."""

    def __init__(
        self,
        *,
        verifier: verifier_pb2_grpc.VerifierAsyncStub,
        policy: policy_pb2_grpc.PolicyAsyncStub,
        store: GrantStore,
        settings: IssuerSettings,
        clock: Clock,
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._store = store
        self._settings = settings
        self._clock = clock

    def _edge(self, context: ServicerContext, rpc: str) -> types_pb2.EdgeContext:
        agent = [v for k, v in context.invocation_metadata() or () if k == "user-agent"]
        return types_pb2.EdgeContext(
            peer=validate.printable(context.peer() or "", 128),
            rpc=rpc,
            user_agent=validate.printable(str(agent[0]) if agent else "", 256),
        )

    async def _authenticate(
        self, context: ServicerContext, rpc: str, budget: _Budget
    ) -> tuple[verifier_pb2.VerifyResponse, types_pb2.EdgeContext]:
        metadata = [(k, v) for k, v in context.invocation_metadata() or ()]
        token = bearer_token(metadata)
        edge = self._edge(context, rpc)
        try:
            verified = await self._verifier.Verify(
                verifier_pb2.VerifyRequest(token=token, edge=edge), timeout=budget.left("verifier")
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, "verifier")
            if not isinstance(error, Unauthenticated | Unavailable):
                error = Unavailable("verifier", str(error))
            raise error from exc
        return verified, edge

    @staticmethod
    def _policy_error(exc: grpc.RpcError) -> JitgateError:
        error = from_rpc_error(exc, "policy")
        # The policy service rejecting the verifier's assertion is jitgate's
        # own fault, not the agent's: fail closed without blaming the token.
        if isinstance(error, Unauthenticated):
            return Unavailable("policy", "rejected the identity assertion")
        return error

    def _grant(self, record: GrantRecord, token: str = "") -> issuer_pb2.Grant:
        return issuer_pb2.Grant(
            grant_id=record.grant_id,
            connection=record.connection,
            subject=record.subject,
            issued_at=wire.timestamp(record.issued_at),
            expires_at=wire.timestamp(record.expires_at),
            token=token,
            proxy_endpoint=record.proxy_endpoint,
            connection_kind=record.connection_kind,
            namespace=record.namespace,
        )

    async def RequestGrant(
        self, request: issuer_pb2.RequestGrantRequest, context: ServicerContext
    ) -> issuer_pb2.Grant:
        """Verify the token, ask for a decision, store the grant with its TTL, return it."""
        connection = validate.connection_name(request.connection)
        ttl = validate.ttl_seconds(request.ttl_seconds)
        reason = validate.reason(request.reason)
        budget = _Budget(self._settings.deadline, context)
        verified, edge = await self._authenticate(context, "RequestGrant", budget)
        try:
            decision: policy_pb2.Decision = await self._policy.Decide(
                policy_pb2.DecideRequest(
                    assertion=verified.assertion,
                    connection=connection,
                    ttl_seconds=ttl,
                    reason=reason,
                    edge=edge,
                ),
                timeout=budget.left("policy"),
            )
        except grpc.RpcError as exc:
            raise self._policy_error(exc) from exc
        subject = verified.identity.subject
        if (
            not decision.allowed
            or not decision.grant_token
            or decision.subject != subject
            or decision.connection != connection
        ):
            raise Unavailable("policy", "answer does not match the request")
        record = GrantRecord(
            grant_id=decision.grant_id,
            subject=subject,
            client_id=verified.identity.client_id,
            connection=connection,
            connection_kind=decision.connection_kind,
            issued_at=wire.seconds(decision.issued_at),
            expires_at=wire.seconds(decision.expires_at),
            proxy_endpoint=self._settings.endpoint(decision.connection_kind),
            namespace=decision.namespace,
        )
        # No grant exists until it is live in Redis: if this fails the agent
        # gets UNAVAILABLE and the signed token is never handed out.
        await self._store.put(record, within=budget.left("redis"))
        telemetry.annotate(grant_id=record.grant_id, connection=connection)
        log.info(
            "grant %s: %s on %s until %.0f", record.grant_id, subject, connection, record.expires_at
        )
        return self._grant(record, decision.grant_token)

    async def GetGrant(
        self, request: issuer_pb2.GetGrantRequest, context: ServicerContext
    ) -> issuer_pb2.Grant:
        """Return one of the caller's live grants, without its token."""
        grant_id = validate.grant_id(request.grant_id)
        budget = _Budget(self._settings.deadline, context)
        verified, _ = await self._authenticate(context, "GetGrant", budget)
        record = await self._store.get(grant_id)
        if record is None or record.subject != verified.identity.subject:
            raise NotFound("grant")
        return self._grant(record)

    async def ListGrants(
        self, request: issuer_pb2.ListGrantsRequest, context: ServicerContext
    ) -> issuer_pb2.ListGrantsResponse:
        """Return the caller's live grants only, without their tokens."""
        budget = _Budget(self._settings.deadline, context)
        verified, _ = await self._authenticate(context, "ListGrants", budget)
        records = await self._store.live(verified.identity.subject, now=self._clock())
        return issuer_pb2.ListGrantsResponse(grants=[self._grant(r) for r in records])

    async def RevokeGrant(
        self, request: issuer_pb2.RevokeGrantRequest, context: ServicerContext
    ) -> issuer_pb2.RevokeGrantResponse:
        """Have policy record and mark the revocation (it checks ownership), then forget it."""
        grant_id = validate.grant_id(request.grant_id)
        reason = validate.reason(request.reason)
        budget = _Budget(self._settings.deadline, context)
        verified, edge = await self._authenticate(context, "RevokeGrant", budget)
        try:
            revoked: policy_pb2.RevokeResponse = await self._policy.Revoke(
                policy_pb2.RevokeRequest(
                    assertion=verified.assertion, grant_id=grant_id, reason=reason, edge=edge
                ),
                timeout=budget.left("policy"),
            )
        except grpc.RpcError as exc:
            raise self._policy_error(exc) from exc
        record = await self._store.get(grant_id)
        if record is not None:
            await self._store.remove(record)
        log.info("grant %s revoked by %s", grant_id, verified.identity.subject)
        return issuer_pb2.RevokeGrantResponse(revoked_at=revoked.revoked_at)
