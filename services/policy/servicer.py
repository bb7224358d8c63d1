"""The Policy gRPC servicer: check the assertion, decide, record, then sign."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, validate, wire
from jitgate.common.clock import Clock
from jitgate.common.errors import NotFound, PermissionDenied
from jitgate.common.grants import GrantRecord
from jitgate.common.jws import Checker, Signer
from jitgate.common.rpc import ServicerContext
from jitgate.policy.decide import MESSAGES, Decision, Request, decide
from jitgate.policy.ledger import Ledger
from jitgate.policy.model import Policy
from jitgate.v1 import audit_pb2, policy_pb2, policy_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

ACL = {
    "/jitgate.v1.Policy/Decide": frozenset({"issuer"}),
    "/jitgate.v1.Policy/Revoke": frozenset({"issuer"}),
}


def _binding(decision: Decision) -> types_pb2.Binding | None:
    if decision.binding is None:
        return None
    b = decision.binding
    return types_pb2.Binding(group=b.group, connection=b.connection, max_ttl_seconds=b.max_ttl)


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """What the servicer needs beyond its collaborators."""

    grant_audience: str
    audit_deadline: float


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    """Decides requests; no grant is signed before its decision record is durable."""

    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        assertions: Checker,
        signer: Signer,
        audit: AuditClient,
        ledger: Ledger,
        settings: PolicySettings,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._assertions = assertions
        self._signer = signer
        self._audit = audit
        self._ledger = ledger
        self._settings = settings
        self._clock = clock

    def _deadline(self, context: ServicerContext) -> float:
        """The audit deadline, shortened to what the caller's own deadline leaves."""
        remaining: float | None = context.time_remaining()  # None: the caller set no deadline
        if remaining is None:
            return self._settings.audit_deadline
        return max(0.0, min(self._settings.audit_deadline, remaining - 0.05))

    async def Decide(
        self, request: policy_pb2.DecideRequest, context: ServicerContext
    ) -> policy_pb2.Decision:
        """Decide, record the decision durably, and only then sign the grant."""
        connection = validate.connection_name(request.connection)
        ttl = validate.ttl_seconds(request.ttl_seconds)
        reason = validate.reason(request.reason)
        now = self._clock()
        identity = assertion.identity_from(self._assertions.check(request.assertion, now))
        policy = self._policy()
        decision = decide(
            policy,
            Request(identity=identity, connection=connection, ttl_seconds=ttl, reason=reason),
            now=now,
        )
        grant_id = secrets.token_hex(16) if decision.allowed else ""
        issued_at, expires_at = now, now + decision.ttl_seconds
        record = audit_pb2.DecisionRecorded(
            connection=connection,
            requested_ttl_seconds=ttl,
            request_reason=reason,
            identity=wire.identity(identity),
            allowed=decision.allowed,
            reason_code=decision.reason_code,
            binding=_binding(decision),
            grant_id=grant_id,
            expires_at=wire.timestamp(expires_at) if decision.allowed else None,
            policy_version=policy.version,
            edge=wire.edge(request.edge),
        )
        # Fail closed: no durable record, no grant (and no denial either: the
        # caller learns only that jitgate could not decide now).
        receipt = await self._audit.append(
            audit_pb2.AuditEvent(decision=record), timeout=self._deadline(context)
        )
        log.info(
            "decision %s for %s on %s: %s (audit index %d)",
            grant_id or "-",
            identity.subject,
            connection,
            decision.reason_code,
            receipt.index,
        )
        if not decision.allowed or decision.connection is None:
            raise PermissionDenied(
                decision.reason_code,
                MESSAGES.get(decision.reason_code, "denied"),
                metadata={"connection": connection},
            )
        # Remember what is signed, where the edge cannot rewrite it (Revoke reads it).
        await self._ledger.issue(
            GrantRecord(
                grant_id=grant_id,
                subject=identity.subject,
                client_id=identity.client_id,
                connection=connection,
                connection_kind=decision.connection.kind,
                issued_at=issued_at,
                expires_at=expires_at,
                proxy_endpoint="",
            )
        )
        token = self._signer.sign(
            {
                "aud": self._settings.grant_audience,
                "sub": identity.subject,
                "jti": grant_id,
                "con": connection,
                "knd": decision.connection.kind,
                "iat": int(issued_at),
                "nbf": int(issued_at),
                "exp": int(expires_at),
            }
        )
        return policy_pb2.Decision(
            allowed=True,
            reason_code=decision.reason_code,
            binding=_binding(decision),
            grant_id=grant_id,
            issued_at=wire.timestamp(issued_at),
            expires_at=wire.timestamp(expires_at),
            grant_token=token,
            connection=connection,
            connection_kind=decision.connection.kind,
            subject=identity.subject,
            policy_version=policy.version,
        )

    async def Revoke(
        self, request: policy_pb2.RevokeRequest, context: ServicerContext
    ) -> policy_pb2.RevokeResponse:
        """Record the revocation durably, then mark the grant revoked for every proxy."""
        grant_id = validate.grant_id(request.grant_id)
        reason = validate.reason(request.reason)
        now = self._clock()
        identity = assertion.identity_from(self._assertions.check(request.assertion, now))
        record = await self._ledger.issued(grant_id)
        # Someone else's grant looks exactly like a missing one: no oracle.
        if record is None or record.subject != identity.subject:
            raise NotFound("grant")
        already = await self._ledger.revoked_at(grant_id)
        if already is not None:
            # Revoking twice records nothing new and keeps the first time.
            return policy_pb2.RevokeResponse(revoked_at=wire.timestamp(already))
        event = audit_pb2.GrantRevoked(
            grant_id=grant_id,
            subject=record.subject,
            connection=record.connection,
            actor=identity.subject,
            reason=reason,
            expires_at=wire.timestamp(record.expires_at),
            edge=wire.edge(request.edge),
        )
        await self._audit.append(
            audit_pb2.AuditEvent(revocation=event), timeout=self._deadline(context)
        )
        await self._ledger.revoke(record, actor=identity.subject, now=now)
        log.info("grant %s revoked by %s", grant_id, identity.subject)
        return policy_pb2.RevokeResponse(revoked_at=wire.timestamp(now))
