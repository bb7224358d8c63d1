"""The Verifier gRPC servicer: token in, identity and a signed assertion out, rejections audited."""

from __future__ import annotations

import logging
from collections.abc import Callable

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, telemetry, wire
from jitgate.common.clock import Clock, system_clock
from jitgate.common.errors import Unauthenticated, Unavailable
from jitgate.common.jws import MAX_TOKEN_BYTES, Signer
from jitgate.common.logs import fingerprint
from jitgate.common.rpc import ServicerContext
from jitgate.v1 import audit_pb2, verifier_pb2, verifier_pb2_grpc
from jitgate.verifier.tokens import AccessTokenVerifier, peek

log = logging.getLogger(__name__)

VERIFICATIONS = telemetry.meter().create_counter(
    "jitgate.tokens.verified", unit="{token}", description="Tokens checked, by outcome and reason"
)

ACL = {"/jitgate.v1.Verifier/Verify": frozenset({"issuer"})}
"""Only the issuer asks the verifier anything."""
SERVICE_NAME = "jitgate.v1.Verifier"


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    """Verify: thin over AccessTokenVerifier and the assertion signer."""

    def __init__(
        self,
        *,
        tokens: AccessTokenVerifier,
        signer: Signer | Callable[[], Signer],
        audit: AuditClient,
        trust_domain: str,
        assertion_ttl: float,
        audit_deadline: float,
        clock: Clock = system_clock,
    ) -> None:
        self._tokens = tokens
        self._signer = signer
        self._audit = audit
        self._trust_domain = trust_domain
        self._assertion_ttl = assertion_ttl
        self._audit_deadline = audit_deadline
        self._clock = clock

    async def Verify(
        self, request: verifier_pb2.VerifyRequest, context: ServicerContext
    ) -> verifier_pb2.VerifyResponse:
        """Return the token's identity and an assertion of it, or raise Unauthenticated."""
        now = self._clock()
        try:
            identity = await self._tokens.authenticate(request.token, now)
            signed, expires = self._vouch(identity, now)
        except Unauthenticated as exc:
            telemetry.annotate(token_rejected=exc.check)
            VERIFICATIONS.add(1, {"jitgate.outcome": "rejected", "jitgate.reason_code": exc.check})
            await self._record_rejection(request, exc)
            raise
        telemetry.annotate(subject=identity.subject)
        VERIFICATIONS.add(1, {"jitgate.outcome": "verified"})
        log.info(
            "verified token %s: subject %r, client %r, groups %s",
            fingerprint(request.token)[:16],
            identity.subject,
            identity.client_id,
            ",".join(identity.groups) or "-",
        )
        return verifier_pb2.VerifyResponse(
            identity=wire.identity(identity),
            assertion=signed,
            assertion_expires_at=wire.timestamp(expires),
        )

    def _vouch(self, identity: assertion.Identity, now: float) -> tuple[str, float]:
        """Return the signed assertion of identity and its expiry, or raise Unauthenticated."""
        # A callable signer follows its key file, so each assertion is signed
        # by the key in force now (keyfiles.WatchedFile).
        signer = self._signer if isinstance(self._signer, Signer) else self._signer()
        signed, expires = assertion.sign(
            signer,
            identity,
            trust_domain=self._trust_domain,
            now=now,
            lifetime=self._assertion_ttl,
        )
        # The assertion JSON escapes non-ASCII (up to 12 bytes for a 4-byte
        # character): an accepted token can vouch for more than the policy
        # service takes. Refused here, as the token's fault: an UNAVAILABLE
        # from the policy service would tell the agent to retry for ever.
        if len(signed) > MAX_TOKEN_BYTES:
            raise Unauthenticated(
                "identity_too_large",
                f"its assertion would be {len(signed)} bytes, over {MAX_TOKEN_BYTES}",
            )
        return signed, expires

    async def _record_rejection(
        self, request: verifier_pb2.VerifyRequest, exc: Unauthenticated
    ) -> None:
        claimed = peek(request.token)
        token_fingerprint = fingerprint(request.token)
        event = audit_pb2.AuditEvent(
            token_rejected=audit_pb2.TokenRejected(
                reason=exc.check,
                token_fingerprint=token_fingerprint,
                claimed_subject=claimed.subject,
                claimed_issuer=claimed.issuer,
                key_id=claimed.key_id,
                edge=wire.edge(request.edge),
            )
        )
        try:
            await self._audit.append(event, timeout=self._audit_deadline)
        except Unavailable as failure:
            # The rejection stands either way; losing its record is the
            # operator's problem to see, not a reason to let the token in.
            log.error(
                "token %s rejected (%s) but the audit record failed: %s",
                token_fingerprint[:16],
                exc.check,
                failure,
            )
