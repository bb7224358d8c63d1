"""Verifier.Verify over real mTLS in-process, with a real HTTPS dev IdP and a recording audit."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.audit.client import AuditClient
from jitgate.common import assertion
from jitgate.common.rpc import caller
from jitgate.common.status import UNAUTHENTICATED_MESSAGE
from jitgate.devstack import idp, idp_http, pki
from jitgate.v1 import audit_pb2, audit_pb2_grpc, types_pb2, verifier_pb2, verifier_pb2_grpc
from jitgate.verifier.oidc import HttpsGetter, JwksCache
from jitgate.verifier.servicer import ACL, SERVICE_NAME, VerifierServicer
from jitgate.verifier.tokens import MAX_TOKEN_BYTES, AccessTokenVerifier
from tests.support import channel, running

from .conftest import NOW, FakeClock

AUDIT_ACL = {"/jitgate.v1.Audit/Append": frozenset({"verifier"})}
EDGE = types_pb2.EdgeContext(
    peer="ipv4:10.0.0.7:5123", rpc="/jitgate.v1.Issuer/RequestGrant", user_agent="bot/1\x07"
)


class RecordingAudit(audit_pb2_grpc.AuditServicer):
    """An Audit that keeps what it is sent, with the caller the guard saw."""

    def __init__(self) -> None:
        self.records: list[tuple[str, audit_pb2.AuditEvent]] = []

    async def Append(self, request: audit_pb2.AppendRequest, context: Any) -> Any:
        self.records.append((caller.get(), request.event))
        return audit_pb2.AppendResponse(index=len(self.records), record_hash=b"\0" * 32)


@dataclass
class Stack:
    port: int
    audit: RecordingAudit
    key: Ed25519PrivateKey
    idp: idp.Idp
    clock: FakeClock

    def verify(
        self, dev: pki.DevPki, token: str, *, as_workload: str = "issuer"
    ) -> Any:  # a coroutine returning VerifyResponse
        async def call() -> verifier_pb2.VerifyResponse:
            async with channel(dev, as_workload, self.port, "verifier") as ch:
                stub = verifier_pb2_grpc.VerifierStub(ch)
                request = verifier_pb2.VerifyRequest(token=token, edge=EDGE)
                response: verifier_pb2.VerifyResponse = await stub.Verify(request, timeout=5)
                return response

        return call()


async def _serve_verifier(
    dev: pki.DevPki,
    server: idp_http.IdpServer,
    audit_port: int,
    clock: FakeClock,
    key: Ed25519PrivateKey,
) -> tuple[Callable[[grpc.aio.Server], None], AuditClient]:
    cache = JwksCache(issuer=server.issuer, getter=HttpsGetter(ca_bundle=dev.ca), clock=clock)
    audit = AuditClient(channel(dev, "verifier", audit_port, "audit"))
    servicer = VerifierServicer(
        tokens=AccessTokenVerifier(issuers={server.issuer: cache}, audience=idp.AUDIENCE),
        signer=assertion.signer(key, "jitgate"),
        audit=audit,
        trust_domain="jitgate",
        assertion_ttl=30,
        audit_deadline=1.0,
        clock=clock,
    )
    return (lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s)), audit


@pytest.fixture
async def stack(dev_pki: pki.DevPki, idp_server: idp_http.IdpServer) -> AsyncIterator[Stack]:
    recording = RecordingAudit()
    clock = FakeClock()
    key = Ed25519PrivateKey.generate()

    def register_audit(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServicer_to_server(recording, server)

    async with running(dev_pki, "audit", register_audit, AUDIT_ACL) as audit_port:
        register, audit = await _serve_verifier(dev_pki, idp_server, audit_port, clock, key)
        async with running(dev_pki, "verifier", register, ACL, (SERVICE_NAME,)) as port:
            yield Stack(port=port, audit=recording, key=key, idp=idp_server.idp, clock=clock)
        await audit.close()


def _token(stack: Stack, **changes: Any) -> str:
    claims = stack.idp.claims(stack.idp.agents["deploy-bot"], now=NOW, scopes=("jitgate",))
    return stack.idp.mint({**claims, **changes})


async def test_a_good_token_returns_its_identity_and_a_policy_grade_assertion(
    dev_pki: pki.DevPki, stack: Stack
) -> None:
    token = _token(stack)
    response = await stack.verify(dev_pki, token)
    identity = response.identity
    assert identity.subject == "deploy-bot"
    assert identity.client_id == "deploy-bot"
    assert list(identity.groups) == ["platform"]
    assert identity.issuer == stack.idp.issuer
    assert identity.token_expires_at.seconds == int(NOW) + idp.DEFAULT_TOKEN_LIFETIME
    assert identity.token_id.startswith("AT.")
    assert response.assertion_expires_at.seconds == int(NOW) + 30
    # What the policy service will do with it:
    checker = assertion.checker([stack.key.public_key()], "jitgate")
    vouched = assertion.identity_from(checker.check(response.assertion, NOW + 1))
    assert vouched.subject == "deploy-bot"
    assert vouched.groups == ("platform",)
    assert vouched.token_id == identity.token_id
    assert stack.audit.records == []


async def test_a_wrong_audience_is_unauthenticated_and_audited(
    dev_pki: pki.DevPki, stack: Stack
) -> None:
    token = _token(stack, aud="api://somewhere-else")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == UNAUTHENTICATED_MESSAGE
    trailers = dict(caught.value.trailing_metadata() or ())
    assert b"aud" not in trailers.get("grpc-status-details-bin", b"")
    [(who, event)] = stack.audit.records
    assert who == "verifier"
    rejected = event.token_rejected
    assert rejected.reason == "aud_mismatch"
    assert rejected.token_fingerprint == hashlib.sha256(token.encode()).hexdigest()
    assert rejected.claimed_subject == "deploy-bot"
    assert rejected.claimed_issuer == stack.idp.issuer
    assert rejected.key_id == stack.idp.kid
    assert rejected.edge.peer == EDGE.peer
    assert rejected.edge.rpc == EDGE.rpc
    assert rejected.edge.user_agent == "bot/1?"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: _token(s, exp=NOW - 3600), "expired"),
        (lambda s: s.idp.mint({"sub": "x"}, alg="none", key=None), "alg_not_allowed"),
        (lambda s: "not-a-token", "segment_count"),
        (lambda s: "", "token_missing"),
    ],
)
async def test_every_rejection_looks_the_same_to_the_caller(
    dev_pki: pki.DevPki, stack: Stack, make: Callable[[Stack], str], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, make(stack))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == UNAUTHENTICATED_MESSAGE
    assert [e.token_rejected.reason for _, e in stack.audit.records] == [reason]


async def test_an_identity_too_large_to_vouch_for_is_a_rejection(
    dev_pki: pki.DevPki, stack: Stack
) -> None:
    # Raw UTF-8 claims: a 3 KB token whose 512 four-byte characters of
    # groups are 12 bytes each once \u-escaped in the assertion.
    claims = stack.idp.claims(stack.idp.agents["deploy-bot"], now=NOW, scopes=("jitgate",))
    groups = ["platform", "\U0001f600" * 256, "\U0001f601" * 256]
    token = stack.idp.mint({**claims, "groups": groups}, ascii_only=False)
    assert len(token) < MAX_TOKEN_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == UNAUTHENTICATED_MESSAGE
    assert [e.token_rejected.reason for _, e in stack.audit.records] == ["identity_too_large"]


async def test_time_is_the_servers_clock(dev_pki: pki.DevPki, stack: Stack) -> None:
    token = _token(stack)
    assert (await stack.verify(dev_pki, token)).identity.subject == "deploy-bot"
    stack.clock.advance(idp.DEFAULT_TOKEN_LIFETIME + 30)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stack.audit.records[0][1].token_rejected.reason == "expired"


async def test_policy_may_not_call_verify(dev_pki: pki.DevPki, stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, _token(stack), as_workload="policy")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stack.audit.records == []


async def test_garbage_request_bytes_are_invalid_argument(
    dev_pki: pki.DevPki, stack: Stack
) -> None:
    async with channel(dev_pki, "issuer", stack.port, "verifier") as ch:
        raw = ch.unary_unary(
            "/jitgate.v1.Verifier/Verify",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff\xff", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_rejection_stands_when_audit_is_down(
    dev_pki: pki.DevPki, idp_server: idp_http.IdpServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    key = Ed25519PrivateKey.generate()
    # A port nothing listens on: the append fails within its deadline.
    register, audit = await _serve_verifier(dev_pki, idp_server, 1, clock, key)
    async with running(dev_pki, "verifier", register, ACL) as port:
        stack = Stack(port=port, audit=RecordingAudit(), key=key, idp=idp_server.idp, clock=clock)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.verify(dev_pki, _token(stack, iss="https://evil.example"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 3
        # A good token does not need audit.
        assert (await stack.verify(dev_pki, _token(stack))).identity.subject == "deploy-bot"
    await audit.close()
    assert "audit record failed" in caplog.text


async def test_no_keys_because_the_idp_is_down_is_unavailable(
    dev_pki: pki.DevPki, stack: Stack, idp_server: idp_http.IdpServer
) -> None:
    token = _token(stack)
    idp_server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.verify(dev_pki, token)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stack.audit.records == []  # not a rejection: nothing was decided


async def test_concurrent_requests_share_one_key_fetch(
    dev_pki: pki.DevPki, stack: Stack, idp_server: idp_http.IdpServer
) -> None:
    results = await asyncio.gather(*(stack.verify(dev_pki, _token(stack)) for _ in range(10)))
    assert {r.identity.subject for r in results} == {"deploy-bot"}
    assert idp_server.requests["keys"] == 1
