"""The Policy gRPC servicer: decide, record, then sign; and redeem for the proxy."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, telemetry, validate, wire
from jitgate.common.clock import Clock
from jitgate.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from jitgate.common.grants import GrantRecord
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.jws import MAX_TOKEN_BYTES, Checker
from jitgate.common.rpc import ServicerContext, caller
from jitgate.policy.decide import CONCURRENCY_LIMIT, MESSAGES, Decision, Request, decide
from jitgate.policy.keyring import GrantKeys
from jitgate.policy.ledger import Ledger, SlotsTaken
from jitgate.policy.model import Policy
from jitgate.v1 import audit_pb2, policy_pb2, policy_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

ISSUED = telemetry.meter().create_counter(
    "jitgate.grants.issued", unit="{grant}", description="Grants signed, by connection"
)
DENIED = telemetry.meter().create_counter(
    "jitgate.grants.denied", unit="{request}", description="Grant requests denied, by reason code"
)

ACL = {
    "/jitgate.v1.Policy/Decide": frozenset({"issuer"}),
    "/jitgate.v1.Policy/Revoke": frozenset({"issuer"}),
    "/jitgate.v1.Policy/RevokeGrants": frozenset({"operator"}),
    "/jitgate.v1.Policy/ListLiveGrants": frozenset({"operator"}),
    "/jitgate.v1.Policy/GetGrantKeys": frozenset({"proxy"}),
    # The proxy is agent-reachable and holds no audit credential: redemptions
    # and closed sessions reach the audit log only through these two.
    "/jitgate.v1.Policy/Redeem": frozenset({"proxy"}),
    "/jitgate.v1.Policy/ReportSession": frozenset({"proxy"}),
}

GRANT_INVALID = "GRANT_INVALID"
GRANT_EXPIRED = "GRANT_EXPIRED"
GRANT_REVOKED = "GRANT_REVOKED"
WRONG_CONNECTION = "WRONG_CONNECTION"
REFUSALS = {
    GRANT_INVALID: "this grant is not valid",
    GRANT_EXPIRED: "this grant has expired",
    GRANT_REVOKED: "this grant was revoked",
    WRONG_CONNECTION: "this grant is for another connection",
}
"""Why Redeem refuses a grant (the ErrorInfo reason), and what the proxy is told."""
SESSION_END_REASONS = frozenset({"expired", "revoked", "client_closed", "server_closed", "error"})
MAX_CLIENT_ADDRESS_CHARS = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
# What a Timestamp may hold (0001-01-01 to 9999-12-31): anything else has no
# JSON form, and audit would refuse the whole event.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _session_id(value: str) -> str:
    if not _SESSION_ID.fullmatch(value):
        raise InvalidArgument("session_id", "must be 1-64 characters of A-Z, a-z, 0-9 or '-'")
    return value


def _client_address(value: str) -> str:
    if len(value) > MAX_CLIENT_ADDRESS_CHARS or not value.isprintable():
        raise InvalidArgument(
            "client_address", f"must be at most {MAX_CLIENT_ADDRESS_CHARS} printable characters"
        )
    return value


def _grant_token(value: str) -> str:
    if not value:
        raise InvalidArgument("grant_token", "is required")
    if len(value.encode()) > MAX_TOKEN_BYTES:
        raise InvalidArgument("grant_token", f"must be at most {MAX_TOKEN_BYTES} bytes")
    return value


def _end_reason(value: str) -> str:
    if value not in SESSION_END_REASONS:
        raise InvalidArgument("reason", f"must be one of {', '.join(sorted(SESSION_END_REASONS))}")
    return value


def _moment(field: str, stamp: Timestamp, present: bool) -> float:
    """Return a required Timestamp as seconds, if it is one audit can record."""
    if not present:
        raise InvalidArgument(field, "is required")
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 10**9:
        raise InvalidArgument(field, "must be between 0001-01-01 and 9999-12-31")
    return wire.seconds(stamp)


class _Refused(Exception):
    """A grant Redeem will not honour: the reason the proxy gets, the detail only the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class _GrantClaims:
    grant_id: str
    subject: str
    connection: str


def _grant_claims(claims: dict[str, object]) -> _GrantClaims:
    """Return the claims Redeem relies on, or refuse a token that lacks them."""
    jti, sub, con = claims.get("jti"), claims.get("sub"), claims.get("con")
    if not isinstance(jti, str) or not isinstance(sub, str) or not isinstance(con, str):
        raise _Refused(GRANT_INVALID, "jti, sub and con must be strings")
    try:
        validate.grant_id(jti)
    except InvalidArgument:
        raise _Refused(GRANT_INVALID, f"jti {jti[:40]!r} is not a grant id") from None
    return _GrantClaims(grant_id=jti, subject=sub, connection=con)


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
    trust_domain: str = DEFAULT_TRUST_DOMAIN


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    """Decides requests; no grant is signed before its decision record is durable."""

    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        assertions: Checker,
        grant_keys: GrantKeys,
        audit: AuditClient,
        ledger: Ledger,
        settings: PolicySettings,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._assertions = assertions
        self._grant_keys = grant_keys
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
        # Whole seconds, as the grant token's iat and exp are (RFC 7519 section
        # 2, NumericDate, written as integers): the expiry the agent is told,
        # the audit record, Redis and the proxy's cut are then one instant,
        # never a fraction of a second apart.
        issued_at = float(int(now))
        expires_at = issued_at + decision.ttl_seconds
        retry_after: float | None = None
        grant = None
        if decision.allowed and decision.connection is not None and decision.binding is not None:
            grant = GrantRecord(
                grant_id=grant_id,
                subject=identity.subject,
                client_id=identity.client_id,
                connection=connection,
                connection_kind=decision.connection.kind,
                issued_at=issued_at,
                expires_at=expires_at,
                proxy_endpoint="",
            )
            if decision.binding.max_concurrent is not None:
                # Race-free: the slot is taken atomically in Redis before
                # anything is recorded, and given back if nothing is signed.
                try:
                    await self._ledger.take_slot(grant, decision.binding.max_concurrent)
                except SlotsTaken as full:
                    retry_after = full.retry_after
                    decision = replace(
                        decision, allowed=False, reason_code=CONCURRENCY_LIMIT, ttl_seconds=0
                    )
                    grant_id, grant = "", None
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
        try:
            receipt = await self._audit.append(
                audit_pb2.AuditEvent(decision=record), timeout=self._deadline(context)
            )
        except Unavailable:
            if grant is not None and decision.binding and decision.binding.max_concurrent:
                await self._ledger.release_slot(grant)
            raise
        log.info(
            "decision %s for %s on %s: %s (audit index %d, checkpoint %d)",
            grant_id or "-",
            identity.subject,
            connection,
            decision.reason_code,
            receipt.index,
            receipt.checkpoint_size,
        )
        outcome = "allow" if grant is not None else "deny"
        telemetry.annotate(
            connection=connection,
            decision=outcome,
            reason_code=decision.reason_code,
            grant_id=grant_id,
            audit_index=receipt.index,
        )
        if grant is None:
            DENIED.add(1, {"jitgate.reason_code": decision.reason_code})
        if not decision.allowed or decision.connection is None or grant is None:
            raise PermissionDenied(
                decision.reason_code,
                MESSAGES.get(decision.reason_code, "denied"),
                metadata={"connection": connection},
                retry_after=retry_after,
            )
        # Remember what is signed, where the edge cannot rewrite it (Revoke reads it).
        # Redis refuses the write past our deadline (hosts' clocks agree: NTP).
        try:
            await self._ledger.issue(grant, deadline=time.time() + self._deadline(context))
        except Unavailable:
            # Nothing is signed: the slot taken for it goes back.
            if decision.binding is not None and decision.binding.max_concurrent:
                with contextlib.suppress(Unavailable):  # Redis is the failure; the slot expires
                    await self._ledger.release_slot(grant)
            raise
        ISSUED.add(1, {"jitgate.connection": connection})
        token = self._grant_keys.signer().sign(
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
            namespace=decision.connection.namespace,
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
        revoked = await self._revoke(
            record,
            actor=identity.subject,
            reason=reason,
            edge=request.edge,
            now=now,
            deadline=self._deadline(context),
        )
        return policy_pb2.RevokeResponse(revoked_at=wire.timestamp(revoked))

    async def RevokeGrants(
        self, request: policy_pb2.RevokeGrantsRequest, context: ServicerContext
    ) -> policy_pb2.RevokeGrantsResponse:
        """The operator revokes one grant, or every live grant of a subject or a connection."""
        reason = validate.reason(request.reason)
        target = request.WhichOneof("target")
        now = self._clock()
        if target == "grant_id":
            ids = [validate.grant_id(request.grant_id)]
        elif target == "subject":
            subject = validate.label("subject", request.subject)
            ids = await self._ledger.live(subject=subject, now=now)
        elif target == "connection":
            connection = validate.connection_name(request.connection)
            ids = await self._ledger.live(connection=connection, now=now)
        else:
            raise InvalidArgument("target", "set one of grant_id, subject, connection")
        # The actor is the operator's certificate, never anything in the request.
        actor = spiffe_id(caller.get(), self._settings.trust_domain)
        revoked: list[str] = []
        for grant_id in ids:
            record = await self._ledger.issued(grant_id)
            if record is None:
                if target == "grant_id":
                    raise NotFound("grant")
                continue  # expired between the index and the record: nothing to revoke
            if await self._ledger.revoked_at(grant_id) is not None:
                continue
            await self._revoke(
                record,
                actor=actor,
                reason=reason,
                edge=None,
                now=now,
                deadline=self._deadline(context),
            )
            revoked.append(grant_id)
        log.info(
            "%s revoked %d grants of %s %s", actor, len(revoked), target, getattr(request, target)
        )
        return policy_pb2.RevokeGrantsResponse(grant_ids=revoked, revoked_at=wire.timestamp(now))

    async def ListLiveGrants(
        self, request: policy_pb2.ListLiveGrantsRequest, context: ServicerContext
    ) -> policy_pb2.LiveGrants:
        """The operator lists the live grants of a subject, a connection, or every connection."""
        limit = min(request.limit or grants.MAX_LISTED, grants.MAX_LISTED)
        target = request.WhichOneof("target")
        subjects, connections = [], []
        if target == "subject":
            subjects.append(validate.label("subject", request.subject))
        elif target == "connection":
            connections.append(validate.connection_name(request.connection))
        else:
            connections.extend(sorted(self._policy().connections))
        found = await self._ledger.soonest(
            subjects=subjects, connections=connections, now=self._clock(), count=limit + 1
        )
        records = await self._ledger.records([grant_id for grant_id, _ in found[:limit]])
        who = spiffe_id(caller.get(), self._settings.trust_domain)
        scope = f"{target} {getattr(request, target)!r}" if target else "every connection"
        log.info("%s listed %d live grants of %s", who, len(records), scope)
        return policy_pb2.LiveGrants(
            grants=[_live_grant(record) for record in records], truncated=len(found) > limit
        )

    async def _revoke(
        self,
        record: GrantRecord,
        *,
        actor: str,
        reason: str,
        edge: types_pb2.EdgeContext | None,
        now: float,
        deadline: float,
    ) -> float:
        """Record the revocation durably, then mark it for every proxy; return when it was."""
        already = await self._ledger.revoked_at(record.grant_id)
        if already is not None:
            # Revoking twice records nothing new and keeps the first time.
            return already
        event = audit_pb2.GrantRevoked(
            grant_id=record.grant_id,
            subject=record.subject,
            connection=record.connection,
            actor=actor,
            reason=reason,
            expires_at=wire.timestamp(record.expires_at),
            edge=wire.edge(edge) if edge is not None else None,
        )
        await self._audit.append(audit_pb2.AuditEvent(revocation=event), timeout=deadline)
        await self._ledger.revoke(record, actor=actor, now=now)
        log.info("grant %s of %s revoked by %s", record.grant_id, record.subject, actor)
        return now

    async def GetGrantKeys(
        self, request: policy_pb2.GetGrantKeysRequest, context: ServicerContext
    ) -> policy_pb2.GrantKeys:
        """Return the public keys that verify grant tokens now."""
        return self._grant_keys.published()

    async def Redeem(
        self, request: policy_pb2.RedeemRequest, context: ServicerContext
    ) -> policy_pb2.RedeemResponse:
        """Check a presented grant against the keys and the ledger, record it, then say yes."""
        token = _grant_token(request.grant_token)
        connection = validate.connection_name(request.connection)
        session_id = _session_id(request.session_id)
        client_address = _client_address(request.client_address)
        try:
            record = await self._redeemable(token, connection, self._clock())
        except _Refused as refused:
            telemetry.annotate(connection=connection, refusal=refused.reason)
            # Refusals go to this service's log only: audit has no event kind for them.
            log.warning(
                "session %s on %s from %s refused: %s (%s)",
                session_id,
                connection,
                client_address or "-",
                refused.reason,
                refused.detail,
            )
            raise PermissionDenied(
                refused.reason, REFUSALS[refused.reason], metadata={"connection": connection}
            ) from None
        event = audit_pb2.GrantRedeemed(
            grant_id=record.grant_id,
            subject=record.subject,
            connection=record.connection,
            session_id=session_id,
            expires_at=wire.timestamp(record.expires_at),
            client_address=client_address,
        )
        # Fail closed: a session that is not on the record must not be opened,
        # and Unavailable tells the proxy exactly that.
        receipt = await self._audit.append(
            audit_pb2.AuditEvent(redemption=event), timeout=self._deadline(context)
        )
        telemetry.annotate(
            grant_id=record.grant_id,
            connection=connection,
            session_id=session_id,
            audit_index=receipt.index,
        )
        log.info(
            "grant %s of %s redeemed for session %s on %s (audit index %d)",
            record.grant_id,
            record.subject,
            session_id,
            connection,
            receipt.index,
        )
        return policy_pb2.RedeemResponse(
            grant_id=record.grant_id,
            subject=record.subject,
            connection=record.connection,
            connection_kind=record.connection_kind,
            expires_at=wire.timestamp(record.expires_at),
        )

    async def _redeemable(self, token: str, connection: str, now: float) -> GrantRecord:
        """Return the ledger's record of the grant in token, or raise _Refused."""
        # Policy is the signer: the keys it publishes are exactly the ones whose
        # grants may still be live, retiring keys included.
        keys = [
            Ed25519PublicKey.from_public_bytes(key.public_key)
            for key in self._grant_keys.published().keys
        ]
        checker = grants.token_checker(
            keys, audience=self._settings.grant_audience, trust_domain=self._settings.trust_domain
        )
        try:
            verified = checker.check(token, now)
        except Unauthenticated as exc:
            # The expiry is checked only after the signature, so GRANT_EXPIRED
            # is only ever said of a grant policy really signed.
            reason = GRANT_EXPIRED if exc.check == "expired" else GRANT_INVALID
            raise _Refused(reason, str(exc)) from None
        claims = _grant_claims(verified)
        if claims.connection != connection:
            raise _Refused(WRONG_CONNECTION, f"grant {claims.grant_id} is for {claims.connection}")
        record = await self._ledger.issued(claims.grant_id)
        if record is None:
            raise _Refused(GRANT_INVALID, f"grant {claims.grant_id} is not in the ledger")
        if (record.subject, record.connection) != (claims.subject, claims.connection):
            raise _Refused(GRANT_INVALID, f"grant {claims.grant_id} differs from the ledger")
        if await self._ledger.revoked_at(record.grant_id) is not None:
            raise _Refused(GRANT_REVOKED, f"grant {record.grant_id} was revoked")
        if record.expires_at <= now:
            raise _Refused(GRANT_EXPIRED, f"grant {record.grant_id} expired")
        return record

    async def ReportSession(
        self, request: policy_pb2.SessionReport, context: ServicerContext
    ) -> policy_pb2.SessionReportAck:
        """Record that a session on a grant policy signed has ended; the subject is the ledger's."""
        grant_id = validate.grant_id(request.grant_id)
        session_id = _session_id(request.session_id)
        connection = validate.connection_name(request.connection)
        reason = _end_reason(request.reason)
        opened_at = _moment("opened_at", request.opened_at, request.HasField("opened_at"))
        closed_at = _moment("closed_at", request.closed_at, request.HasField("closed_at"))
        if closed_at < opened_at:
            raise InvalidArgument("closed_at", "must not be before opened_at")
        record = await self._ledger.issued(grant_id)
        if record is None:
            raise NotFound("grant")
        if record.connection != connection:
            raise PermissionDenied(
                WRONG_CONNECTION, REFUSALS[WRONG_CONNECTION], metadata={"connection": connection}
            )
        event = audit_pb2.SessionClosed(
            grant_id=grant_id,
            session_id=session_id,
            subject=record.subject,
            connection=record.connection,
            reason=reason,
            bytes_from_client=request.bytes_from_client,
            bytes_to_client=request.bytes_to_client,
            # A fresh Timestamp, not the request's: fields unknown to this build
            # would ride along and audit would refuse the record (the edge's
            # bad input would read as audit being down).
            opened_at=Timestamp(seconds=request.opened_at.seconds, nanos=request.opened_at.nanos),
        )
        receipt = await self._audit.append(
            audit_pb2.AuditEvent(session_closed=event), timeout=self._deadline(context)
        )
        log.info(
            "session %s of grant %s (%s on %s) closed after %.1fs: %s (audit index %d)",
            session_id,
            grant_id,
            record.subject,
            record.connection,
            closed_at - opened_at,
            reason,
            receipt.index,
        )
        return policy_pb2.SessionReportAck()


def _live_grant(record: GrantRecord) -> policy_pb2.LiveGrant:
    """A ledger record as the operator sees it: everything but a token (it holds none)."""
    return policy_pb2.LiveGrant(
        grant_id=record.grant_id,
        subject=record.subject,
        client_id=record.client_id,
        connection=record.connection,
        connection_kind=record.connection_kind,
        namespace=record.namespace,
        issued_at=wire.timestamp(record.issued_at),
        expires_at=wire.timestamp(record.expires_at),
    )
