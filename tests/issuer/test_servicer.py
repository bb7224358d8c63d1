"""The issuer over real TLS with a real policy service, audit stand-in and real Redis.

The verifier here is a stand-in that signs real assertions: the token checks
themselves are the verifier's tests; end-to-end tests run the real one.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp

from jitgate import client as sdk
from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, redisconn, tls, wire
from jitgate.common.errors import Unauthenticated
from jitgate.common.rpc import ServicerContext
from jitgate.devstack.pki import DevPki
from jitgate.devstack.redis_server import RedisServer, free_port
from jitgate.issuer.servicer import IssuerServicer, IssuerSettings, bearer_token
from jitgate.issuer.store import GrantStore
from jitgate.policy import model
from jitgate.policy.keyring import SingleKey
from jitgate.policy.ledger import Ledger
from jitgate.policy.servicer import ACL as POLICY_ACL
from jitgate.policy.servicer import PolicyServicer, PolicySettings
from jitgate.v1 import (
    issuer_pb2,
    issuer_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    types_pb2,
    verifier_pb2,
    verifier_pb2_grpc,
)
from tests.support import AUDIT_ACL, RecordingAudit, running, serve_audit

T = TypeVar("T")
VERIFIER_KEY = Ed25519PrivateKey.generate()
POLICY = model.parse(
    """
[connections.orders-replica]
kind = "postgres"
[connections.billing-primary]
kind = "postgres"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = "5m"
"""
)


class FakeVerifier(verifier_pb2_grpc.VerifierServicer):
    """Accepts "good:<subject>" tokens.

    "down" plays an unreachable IdP, "stall" a verifier that never answers,
    "expiring:<subject>" a token that expires within the current second, and "rogue:<subject>"
    an assertion signed with a key the policy service does not trust.
    """

    def __init__(self) -> None:
        self.edges: list[types_pb2.EdgeContext] = []

    async def Verify(
        self, request: verifier_pb2.VerifyRequest, context: ServicerContext
    ) -> verifier_pb2.VerifyResponse:
        self.edges.append(request.edge)
        if request.token == "down":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "jwks unreachable")
        if request.token == "stall":
            await asyncio.sleep(30)
        kind, _, subject = request.token.partition(":")
        if kind not in ("good", "expiring", "rogue") or not subject:
            raise Unauthenticated("signature")
        key = Ed25519PrivateKey.generate() if kind == "rogue" else VERIFIER_KEY
        # Grants count whole seconds (policy.decide), so "expiring" must end within
        # this second: half a second left can round up to one whole second.
        now = time.time()
        expires_at = float(int(now)) if kind == "expiring" else now + 3600
        identity = assertion.Identity(
            subject=subject,
            client_id=subject,
            groups=("platform",),
            token_expires_at=expires_at,
            issuer="https://idp",
        )
        token, _ = assertion.sign(
            assertion.signer(key, "jitgate"),
            identity,
            trust_domain="jitgate",
            now=time.time(),
            lifetime=30,
        )
        stamp = Timestamp()
        stamp.FromSeconds(int(identity.token_expires_at))
        return verifier_pb2.VerifyResponse(
            identity=types_pb2.Identity(
                subject=subject, client_id=subject, groups=["platform"], token_expires_at=stamp
            ),
            assertion=token,
        )


@dataclass
class Rig:
    issuer: str
    ca: Any
    audit: RecordingAudit
    verifier: FakeVerifier

    def client(self, token: str) -> sdk.IssuerClient:
        return sdk.IssuerClient(self.issuer, token=token, ca_file=self.ca, timeout=5)


async def call(rig: Rig, token: str, action: Callable[[sdk.IssuerClient], T]) -> T:
    """Run a synchronous SDK call off the loop that serves the in-process services."""

    def run() -> T:
        with rig.client(token) as agent:
            return action(agent)

    return await asyncio.to_thread(run)


@asynccontextmanager
async def open_rig(
    dev_pki: DevPki, redis_server: RedisServer, issuer_redis: str | None = None
) -> AsyncIterator[Rig]:
    """The issuer with a real policy service; issuer_redis overrides the issuer's Redis."""
    audit, fake_verifier = RecordingAudit(), FakeVerifier()
    async with (
        running(dev_pki, "audit", serve_audit(audit), AUDIT_ACL) as audit_port,
        running(
            dev_pki,
            "verifier",
            lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(fake_verifier, s),
            {"/jitgate.v1.Verifier/Verify": frozenset({"issuer"})},
        ) as verifier_port,
    ):
        audit_channel = tls.secure_channel(
            f"127.0.0.1:{audit_port}",
            tls.channel_credentials(dev_pki.files("policy")),
            server_name="audit",
        )
        policy_servicer = PolicyServicer(
            policy=lambda: POLICY,
            assertions=assertion.checker([VERIFIER_KEY.public_key()], "jitgate"),
            grant_keys=SingleKey(grants.token_signer(Ed25519PrivateKey.generate(), "jitgate")),
            audit=AuditClient(audit_channel),
            ledger=Ledger(redisconn.connect(redis_server.url("policy"))),
            settings=PolicySettings(grant_audience="spiffe://jitgate/proxy", audit_deadline=0.5),
            clock=time.time,
        )
        async with (
            running(
                dev_pki,
                "policy",
                lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(policy_servicer, s),
                POLICY_ACL,
            ) as policy_port,
            serve_issuer(
                dev_pki, verifier_port, policy_port, issuer_redis or redis_server.url("issuer")
            ) as address,
        ):
            yield Rig(issuer=address, ca=dev_pki.ca, audit=audit, verifier=fake_verifier)
        await audit_channel.close()


@asynccontextmanager
async def serve_issuer(
    dev_pki: DevPki, verifier_port: int, policy_port: int, redis_url: str
) -> AsyncIterator[str]:
    """The real issuer in front of whatever verifier and policy listen on those ports."""
    credentials = tls.channel_credentials(dev_pki.files("issuer"))
    verifier = tls.secure_channel(f"127.0.0.1:{verifier_port}", credentials, server_name="verifier")
    policy = tls.secure_channel(f"127.0.0.1:{policy_port}", credentials, server_name="policy")
    store = GrantStore(redis_url)
    issuer = IssuerServicer(
        verifier=verifier_pb2_grpc.VerifierStub(verifier),
        policy=policy_pb2_grpc.PolicyStub(policy),
        store=store,
        settings=IssuerSettings(proxy_endpoint="127.0.0.1:6432", deadline=1.5),
        clock=time.time,
    )

    def register(server: grpc.aio.Server) -> None:
        issuer_pb2_grpc.add_IssuerServicer_to_server(issuer, server)

    async with running(dev_pki, "issuer", register, None) as port:
        yield f"127.0.0.1:{port}"
    for ch in (verifier, policy):
        await ch.close()
    await store.close()


@pytest.fixture
async def rig(
    dev_pki: DevPki, redis_server: RedisServer, redis_admin: redis.Redis
) -> AsyncIterator[Rig]:
    async with open_rig(dev_pki, redis_server) as opened:
        yield opened


async def test_request_stores_the_grant_until_it_expires(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    grant = await call(
        rig,
        "good:deploy-bot",
        lambda a: a.request_grant("orders-replica", ttl_seconds=90, reason="r"),
    )
    assert grant.connection == "orders-replica"
    assert grant.connection_kind == "postgres"
    assert grant.subject == "deploy-bot"
    assert grant.token
    assert grant.proxy_endpoint == "127.0.0.1:6432"
    assert 88_000 < redis_admin.pttl(grants.grant_key(grant.grant_id)) <= 90_000
    assert rig.audit.kinds() == ["decision"]
    assert rig.verifier.edges[0].rpc == "RequestGrant"
    assert rig.verifier.edges[0].user_agent.startswith("jitgate-client/")


async def test_get_and_list_show_only_the_callers_grants_without_tokens(rig: Rig) -> None:
    mine = await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
    theirs = await call(rig, "good:other-bot", lambda a: a.request_grant("orders-replica"))
    listed = await call(rig, "good:deploy-bot", lambda a: a.list_grants())
    assert [g.grant_id for g in listed] == [mine.grant_id]
    assert listed[0].token == ""
    got = await call(rig, "good:deploy-bot", lambda a: a.get_grant(mine.grant_id))
    assert (got.grant_id, got.token) == (mine.grant_id, "")
    with pytest.raises(sdk.NotFound):
        await call(rig, "good:deploy-bot", lambda a: a.get_grant(theirs.grant_id))


async def test_revoke_goes_through_policy_and_forgets_the_grant(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    grant = await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
    with pytest.raises(sdk.NotFound):
        await call(rig, "good:other-bot", lambda a: a.revoke_grant(grant.grant_id))
    await call(rig, "good:deploy-bot", lambda a: a.revoke_grant(grant.grant_id, reason="done"))
    assert not redis_admin.exists(grants.grant_key(grant.grant_id))
    assert redis_admin.exists(grants.revoked_key(grant.grant_id))
    assert await call(rig, "good:deploy-bot", lambda a: a.list_grants()) == []
    assert rig.audit.kinds() == ["decision", "revocation"]


async def test_a_denial_reaches_the_agent_with_its_reason(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    with pytest.raises(sdk.Denied) as raised:
        await call(rig, "good:deploy-bot", lambda a: a.request_grant("billing-primary"))
    assert raised.value.reason == "NO_BINDING"
    assert not redis_admin.keys("grant:*")


@pytest.mark.parametrize("token", ["forged", "good:"[:-1], "x" * 9000])
async def test_a_bad_token_is_unauthenticated_and_says_nothing(rig: Rig, token: str) -> None:
    with pytest.raises(sdk.Unauthenticated) as raised:
        await call(rig, token, lambda a: a.request_grant("orders-replica"))
    assert str(raised.value) == "authentication failed"


async def test_a_missing_bearer_is_unauthenticated(rig: Rig) -> None:
    async with tls.secure_channel(
        rig.issuer, grpc.ssl_channel_credentials(rig.ca.read_bytes()), server_name="issuer"
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await issuer_pb2_grpc.IssuerStub(ch).ListGrants(
                issuer_pb2.ListGrantsRequest(), timeout=5
            )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_verifier_down_is_unavailable(rig: Rig, redis_admin: redis.Redis) -> None:
    with pytest.raises(sdk.Unavailable):
        await call(rig, "down", lambda a: a.request_grant("orders-replica"))
    assert not redis_admin.keys("grant:*")


async def test_audit_down_is_unavailable_and_leaves_no_grant(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    rig.audit.mode = "stall"
    started = time.monotonic()
    with pytest.raises(sdk.Unavailable):
        await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
    assert time.monotonic() - started < 2.5
    assert not redis_admin.keys("grant:*")


@pytest.mark.parametrize(
    ("action", "field"),
    [
        (lambda a: a.request_grant(""), "connection"),
        (lambda a: a.request_grant("x y"), "connection"),
        (lambda a: a.request_grant("orders-replica", ttl_seconds=10**6), "ttl_seconds"),
        (lambda a: a.request_grant("orders-replica", reason="\x07"), "reason"),
        (lambda a: a.get_grant("../../etc"), "grant_id"),
        (lambda a: a.revoke_grant("G" * 32), "grant_id"),
    ],
)
async def test_malformed_requests_name_the_field(
    rig: Rig, action: Callable[[sdk.IssuerClient], object], field: str
) -> None:
    with pytest.raises(sdk.InvalidRequest) as raised:
        await call(rig, "good:deploy-bot", action)
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("metadata", "check"),
    [
        ([], "bearer"),
        ([("authorization", "Basic abc")], "bearer"),
        ([("authorization", "Bearer ")], "bearer"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "bearer"),
        ([("authorization", b"Bearer a")], "bearer"),
        ([("authorization", "Bearer " + "a" * 9000)], "size"),
    ],
)
def test_bearer_token_rejections(metadata: list[tuple[str, str | bytes]], check: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        bearer_token(metadata)
    assert raised.value.check == check


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token([("authorization", "bearer abc")]) == "abc"


@pytest.mark.parametrize(
    ("connection", "token", "reason"),
    [
        ("no-such-connection", "good:deploy-bot", "CONNECTION_UNKNOWN"),
        ("orders-replica", "expiring:deploy-bot", "TOKEN_EXPIRING"),
    ],
)
async def test_every_denial_reason_reaches_the_agent(
    rig: Rig, connection: str, token: str, reason: str
) -> None:
    with pytest.raises(sdk.Denied) as raised:
        await call(rig, token, lambda a: a.request_grant(connection))
    assert raised.value.reason == reason


async def test_a_stalled_verifier_is_unavailable_within_the_budget(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    started = time.monotonic()
    with pytest.raises(sdk.Unavailable):
        await call(rig, "stall", lambda a: a.request_grant("orders-replica"))
    assert time.monotonic() - started < 2.5  # the issuer's budget here is 1.5 s
    assert not redis_admin.keys("grant:*")


async def test_policy_refusing_the_assertion_is_not_blamed_on_the_token(rig: Rig) -> None:
    # A rejected assertion is jitgate's own fault: UNAVAILABLE, not UNAUTHENTICATED.
    with pytest.raises(sdk.Unavailable):
        await call(rig, "rogue:deploy-bot", lambda a: a.request_grant("orders-replica"))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",
        b"\x0a\x02\xc3\x28",  # connection = invalid UTF-8
        b"\x10" + b"\xff" * 11,  # ttl_seconds, an overlong varint
    ],
)
async def test_undecodable_requests_are_invalid_argument(rig: Rig, payload: bytes) -> None:
    async with tls.secure_channel(
        rig.issuer, grpc.ssl_channel_credentials(rig.ca.read_bytes()), server_name="issuer"
    ) as ch:
        request = ch.unary_unary(
            "/jitgate.v1.Issuer/RequestGrant",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await request(payload, timeout=5, metadata=(("authorization", "Bearer good:x"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_down_means_unavailable_and_no_token(
    dev_pki: DevPki, redis_server: RedisServer
) -> None:
    dead = f"redis://issuer:x@127.0.0.1:{free_port()}/0"
    async with open_rig(dev_pki, redis_server, issuer_redis=dead) as rig:
        with pytest.raises(sdk.Unavailable):
            await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))


async def test_a_stalled_redis_leaves_no_grant_behind_when_it_resumes(
    dev_pki: DevPki, redis_server: RedisServer, tmp_path: Path
) -> None:
    stalled = RedisServer(workdir=tmp_path, port=free_port())
    stalled.start()
    assert stalled.process is not None
    try:
        async with open_rig(dev_pki, redis_server, issuer_redis=stalled.url("issuer")) as rig:
            # A first grant leaves a pooled connection, so the next write is sent
            # into the stalled server rather than stuck in the handshake.
            first = await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
            stalled.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(sdk.Unavailable):
                await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
            assert time.monotonic() - started < 2.5
            stalled.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.5)  # the queued write runs now, after its deadline
            admin = redis.Redis.from_url(stalled.url("admin"))
            assert admin.keys("grant:*") == [grants.grant_key(first.grant_id).encode()]
            admin.close()
    finally:
        stalled.process.send_signal(signal.SIGCONT)
        stalled.stop()


class LyingPolicy(policy_pb2_grpc.PolicyServicer):
    """Allows, but for someone or something other than what was asked."""

    def __init__(self, lie: str) -> None:
        self.lie = lie

    async def Decide(
        self, request: policy_pb2.DecideRequest, context: ServicerContext
    ) -> policy_pb2.Decision:
        now = time.time()
        return policy_pb2.Decision(
            allowed=self.lie != "denied-but-token",
            grant_id="ab" * 16,
            grant_token="token",
            subject="someone-else" if self.lie == "subject" else "deploy-bot",
            connection="billing-primary" if self.lie == "connection" else request.connection,
            issued_at=wire.timestamp(now),
            expires_at=wire.timestamp(now + 60),
        )


@pytest.mark.parametrize("lie", ["subject", "connection", "denied-but-token"])
async def test_an_answer_that_does_not_match_the_request_grants_nothing(
    dev_pki: DevPki, redis_server: RedisServer, redis_admin: redis.Redis, lie: str
) -> None:
    async with (
        running(
            dev_pki,
            "verifier",
            lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(FakeVerifier(), s),
            {"/jitgate.v1.Verifier/Verify": frozenset({"issuer"})},
        ) as verifier_port,
        running(
            dev_pki,
            "policy",
            lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(LyingPolicy(lie), s),
            POLICY_ACL,
        ) as policy_port,
        serve_issuer(dev_pki, verifier_port, policy_port, redis_server.url("issuer")) as address,
    ):
        rig = Rig(issuer=address, ca=dev_pki.ca, audit=RecordingAudit(), verifier=FakeVerifier())
        with pytest.raises(sdk.Unavailable):
            await call(rig, "good:deploy-bot", lambda a: a.request_grant("orders-replica"))
    assert redis_admin.keys("grant:*") == []
