"""The policy service over real mTLS: decide, record durably, and only then sign."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jitgate.audit.client import AuditClient
from jitgate.common import assertion, grants, redisconn, tls, wire
from jitgate.common.assertion import Identity
from jitgate.common.errors import Unavailable
from jitgate.common.jws import MAX_TOKEN_BYTES
from jitgate.devstack.pki import DevPki
from jitgate.devstack.redis_server import RedisServer, free_port
from jitgate.policy import model
from jitgate.policy.keyring import SingleKey
from jitgate.policy.ledger import Ledger
from jitgate.policy.servicer import ACL, PolicyServicer, PolicySettings
from jitgate.v1 import audit_pb2, policy_pb2, policy_pb2_grpc
from tests.support import AUDIT_ACL, RecordingAudit, channel, running, serve_audit

VERIFIER_KEY = Ed25519PrivateKey.generate()
POLICY_KEY = Ed25519PrivateKey.generate()
POLICY = model.parse(
    """
[connections.orders-replica]
kind = "postgres"
[connections.billing-primary]
kind = "postgres"
[connections.ledger-admin]
kind = "ssh"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = "5m"
[[bindings]]
group = "platform"
connection = "ledger-admin"
max_ttl = "5m"
require_reason = true
max_concurrent = 2
"""
)
AUDIENCE = "spiffe://jitgate/proxy"


@dataclass
class Rig:
    port: int
    audit: RecordingAudit
    dev: DevPki


def _assertion(
    subject: str = "deploy-bot", *, key: Ed25519PrivateKey = VERIFIER_KEY, age: float = 0
) -> str:
    """An assertion as the verifier signs it, made `age` seconds ago."""
    now = time.time() - age
    identity = Identity(
        subject=subject,
        client_id=subject,
        groups=("platform",),
        token_expires_at=now + 3600,
        issuer="i",
    )
    token, _ = assertion.sign(
        assertion.signer(key, "jitgate"), identity, trust_domain="jitgate", now=now, lifetime=30
    )
    return token


async def _rig(
    dev: DevPki, redis_url: str, audit: RecordingAudit, deadline: float
) -> AsyncIterator[Rig]:
    async with running(dev, "audit", serve_audit(audit), AUDIT_ACL) as audit_port:
        audit_channel = tls.secure_channel(
            f"127.0.0.1:{audit_port}",
            tls.channel_credentials(dev.files("policy")),
            server_name="audit",
        )
        ledger = Ledger(redisconn.connect(redis_url))
        servicer = PolicyServicer(
            policy=lambda: POLICY,
            assertions=assertion.checker([VERIFIER_KEY.public_key()], "jitgate"),
            grant_keys=SingleKey(grants.token_signer(POLICY_KEY, "jitgate")),
            audit=AuditClient(audit_channel),
            ledger=ledger,
            settings=PolicySettings(grant_audience=AUDIENCE, audit_deadline=deadline),
            clock=time.time,
        )

        def register(server: grpc.aio.Server) -> None:
            policy_pb2_grpc.add_PolicyServicer_to_server(servicer, server)

        async with running(dev, "policy", register, ACL) as port:
            yield Rig(port=port, audit=audit, dev=dev)
        await audit_channel.close()
        await ledger.close()


@pytest.fixture
async def rig(
    dev_pki: DevPki, redis_server: RedisServer, redis_admin: redis.Redis
) -> AsyncIterator[Rig]:
    async for r in _rig(dev_pki, redis_server.url("policy"), RecordingAudit(), 0.5):
        yield r


async def _decide(rig: Rig, connection: str, **fields: object) -> policy_pb2.Decision:
    request = policy_pb2.DecideRequest(
        assertion=str(fields.pop("assertion", _assertion())),
        connection=connection,
        **fields,
    )
    async with channel(rig.dev, "issuer", rig.port, "policy") as ch:
        return await policy_pb2_grpc.PolicyStub(ch).Decide(request, timeout=5)


async def test_allow_records_the_decision_then_signs_a_one_connection_grant(rig: Rig) -> None:
    decision = await _decide(rig, "orders-replica", ttl_seconds=120, reason="slow queries")
    assert decision.allowed
    assert decision.expires_at.seconds - decision.issued_at.seconds == 120
    claims = grants.token_checker(
        [POLICY_KEY.public_key()], audience=AUDIENCE, trust_domain="jitgate"
    ).check(decision.grant_token, time.time())
    assert (claims["jti"], claims["con"], claims["sub"]) == (
        decision.grant_id,
        "orders-replica",
        "deploy-bot",
    )
    [(who, event)] = rig.audit.events
    assert who == "policy"
    record = event.decision
    assert (record.allowed, record.grant_id, record.reason_code) == (
        True,
        decision.grant_id,
        "ALLOWED",
    )
    assert record.identity.subject == "deploy-bot"
    assert record.request_reason == "slow queries"
    assert record.policy_version == POLICY.version
    assert record.binding.group == "platform"
    assert record.expires_at == decision.expires_at
    # One instant everywhere: the token's whole-second exp is the expiry told.
    assert (decision.issued_at.nanos, decision.expires_at.nanos) == (0, 0)
    assert (claims["iat"], claims["exp"]) == (
        decision.issued_at.seconds,
        decision.expires_at.seconds,
    )


async def test_a_denial_is_recorded_and_carries_its_reason(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, "billing-primary")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(raised.value)
    info = error_details_pb2.ErrorInfo()
    assert status is not None
    assert status.details[0].Unpack(info)
    assert info.reason == "NO_BINDING"
    [(_, event)] = rig.audit.events
    assert not event.decision.allowed
    assert event.decision.reason_code == "NO_BINDING"
    assert event.decision.grant_id == ""


async def test_audit_refusing_means_unavailable_and_no_grant(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    rig.audit.mode = "fail"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, "orders-replica")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # Nothing was signed: the ledger, written just before signing, is empty.
    assert redis_admin.keys("issued:*") == []


async def test_a_stalled_audit_means_unavailable_within_the_deadline(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    rig.audit.mode = "stall"
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, "orders-replica")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.5  # the audit deadline here is 0.5 s
    assert redis_admin.keys("issued:*") == []


@pytest.mark.parametrize(
    "bad",
    [
        _assertion(key=Ed25519PrivateKey.generate()),
        _assertion(age=600),
        "not-a-jwt",
        "",
    ],
)
async def test_an_assertion_the_verifier_did_not_sign_is_unauthenticated(
    rig: Rig, bad: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, "orders-replica", assertion=bad)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not rig.audit.events


@pytest.mark.parametrize(
    ("connection", "fields"),
    [
        ("", {}),
        ("Orders Replica", {}),
        ("orders-replica", {"ttl_seconds": 10**6}),
        ("orders-replica", {"reason": "a\x00b"}),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    rig: Rig, connection: str, fields: dict[str, object]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, connection, **fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _granted(rig: Rig, subject: str = "deploy-bot") -> policy_pb2.Decision:
    """A grant as policy signed it, so that its ledger knows it."""
    decision = await _decide(rig, "orders-replica", assertion=_assertion(subject))
    rig.audit.events.clear()
    return decision


async def _revoke(
    rig: Rig, grant_id: str, subject: str = "deploy-bot"
) -> policy_pb2.RevokeResponse:
    async with channel(rig.dev, "issuer", rig.port, "policy") as ch:
        return await policy_pb2_grpc.PolicyStub(ch).Revoke(
            policy_pb2.RevokeRequest(
                assertion=_assertion(subject), grant_id=grant_id, reason="done"
            ),
            timeout=5,
        )


async def test_revoke_records_then_marks_and_announces(rig: Rig, redis_admin: redis.Redis) -> None:
    grant = await _granted(rig)
    pubsub = redis_admin.pubsub()
    pubsub.subscribe(grants.REVOCATION_CHANNEL)
    pubsub.get_message(timeout=1)
    await _revoke(rig, grant.grant_id)
    assert redis_admin.exists(grants.revoked_key(grant.grant_id))
    marker_expiry = time.time() + redis_admin.pttl(grants.revoked_key(grant.grant_id)) / 1000
    assert marker_expiry >= grant.expires_at.seconds
    message = pubsub.get_message(timeout=2)
    assert message is not None
    assert message["data"] == grant.grant_id.encode()
    assert rig.audit.kinds() == ["revocation"]
    assert rig.audit.events[0][1].revocation.actor == "deploy-bot"


async def test_revoking_twice_records_once_and_keeps_the_first_time(rig: Rig) -> None:
    grant = await _granted(rig)
    first = await _revoke(rig, grant.grant_id)
    second = await _revoke(rig, grant.grant_id)
    assert second.revoked_at == first.revoked_at
    assert rig.audit.kinds() == ["revocation"]


async def test_someone_elses_grant_looks_missing(rig: Rig, redis_admin: redis.Redis) -> None:
    theirs = await _granted(rig, "other-bot")
    for grant_id in (theirs.grant_id, "cd" * 16):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _revoke(rig, grant_id)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert not redis_admin.exists(grants.revoked_key(theirs.grant_id))
    assert not rig.audit.events


async def test_what_the_issuer_can_write_does_not_steer_a_revocation(
    rig: Rig, redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    # The issuer is agent-reachable: its Redis user can rewrite grant:* at will,
    # e.g. to name another owner or an expiry in the past. Revoke must not care.
    grant = await _granted(rig, "other-bot")
    issuer = redis.Redis.from_url(redis_server.url("issuer"))
    forged = {"subject": "deploy-bot", "expires_at": "1.0", "grant_id": grant.grant_id}
    issuer.hset(grants.grant_key(grant.grant_id), mapping=forged)
    with pytest.raises(redis.exceptions.NoPermissionError):
        issuer.hset(grants.issued_key(grant.grant_id), mapping=forged)
    issuer.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _revoke(rig, grant.grant_id, "deploy-bot")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    await _revoke(rig, grant.grant_id, "other-bot")
    assert redis_admin.pttl(grants.revoked_key(grant.grant_id)) > 60_000
    assert rig.audit.events[0][1].revocation.expires_at == grant.expires_at


async def test_revoke_with_audit_down_marks_nothing(rig: Rig, redis_admin: redis.Redis) -> None:
    grant = await _granted(rig)
    rig.audit.mode = "fail"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _revoke(rig, grant.grant_id)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not redis_admin.exists(grants.revoked_key(grant.grant_id))


async def test_redis_down_means_unavailable_and_no_grant(dev_pki: DevPki) -> None:
    dead = f"redis://policy:x@127.0.0.1:{free_port()}/0"
    async for rig in _rig(dev_pki, dead, RecordingAudit(), 0.5):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _decide(rig, "orders-replica")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _revoke(rig, "ab" * 16)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        # A token policy signed, but no ledger to check it against: fail closed.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _redeem(rig, _token())
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redemption" not in rig.audit.kinds()


@pytest.mark.parametrize(
    "command",
    [
        # Policy may forget the issuer's copy of a grant it revokes (grant:*,
        # agent:*), being the authority that signed it; nothing else.
        lambda c: c.set("session:ab", "x"),
        lambda c: c.delete("proxy:sessions"),
        lambda c: c.flushall(),
        lambda c: c.keys("*"),
        lambda c: c.config_get("*"),
    ],
)
async def test_the_policy_user_reaches_no_key_it_does_not_need(
    redis_server: RedisServer, command: Callable[[redis.Redis], object]
) -> None:
    client = redis.Redis.from_url(redis_server.url("policy"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        command(client)
    client.close()


async def test_concurrent_decisions_each_get_their_own_grant(rig: Rig) -> None:
    decisions = await asyncio.gather(*(_decide(rig, "orders-replica") for _ in range(20)))
    assert len({d.grant_id for d in decisions}) == 20
    assert len(rig.audit.events) == 20


# Conditions: a reason, and a cap on concurrent grants counted in Redis.


def _denial(error: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    status = rpc_status.from_call(error)
    assert status is not None
    reason, retry = "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            delay = error_details_pb2.RetryInfo()
            detail.Unpack(delay)
            retry = delay.retry_delay.seconds + delay.retry_delay.nanos / 1e9
    return reason, retry


async def test_a_binding_that_requires_a_reason_denies_a_request_without_one(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _decide(rig, "ledger-admin", reason="   ")
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _denial(raised.value) == ("REASON_REQUIRED", None)
    [(_, event)] = rig.audit.events
    assert (event.decision.allowed, event.decision.reason_code) == (False, "REASON_REQUIRED")
    assert (await _decide(rig, "ledger-admin", reason="rotate the ledger key")).allowed


async def test_two_slots_go_to_exactly_two_of_many_simultaneous_requests(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    subject = f"cap-{time.time_ns()}"
    outcomes = await asyncio.gather(
        *(
            _decide(rig, "ledger-admin", reason="r", ttl_seconds=60, assertion=_assertion(subject))
            for _ in range(12)
        ),
        return_exceptions=True,
    )
    allowed = [o for o in outcomes if isinstance(o, policy_pb2.Decision)]
    denied = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(allowed) == 2
    assert len(denied) == 10
    for error in denied:
        reason, retry = _denial(error)
        assert reason == "CONCURRENCY_LIMIT"
        # The earliest live grant frees its slot in about a minute.
        assert retry is not None
        assert 50 < retry <= 60
    recorded = [e.decision.reason_code for _, e in rig.audit.events]
    assert sorted(recorded) == ["ALLOWED"] * 2 + ["CONCURRENCY_LIMIT"] * 10
    # Revoking one frees a slot for the next request.
    async with channel(rig.dev, "operator", rig.port, "policy") as ch:
        await policy_pb2_grpc.PolicyStub(ch).RevokeGrants(
            policy_pb2.RevokeGrantsRequest(grant_id=allowed[0].grant_id, reason="done"),
            timeout=5,
        )
    again = await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))
    assert again.allowed


async def test_a_slot_is_given_back_when_the_decision_cannot_be_recorded(
    dev_pki: DevPki, redis_server: RedisServer, redis_admin: redis.Redis
) -> None:
    subject = f"cap-{time.time_ns()}"
    failing = RecordingAudit()
    async for rig in _rig(dev_pki, redis_server.url("policy"), failing, 0.5):
        failing.mode = "fail"
        for _ in range(3):  # more than the cap: every failed attempt gave its slot back
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        failing.mode = "record"
        assert (
            await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))
        ).allowed


async def test_a_slot_is_given_back_when_the_grant_cannot_be_stored(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recorded, then the ledger write fails (Redis late or gone): nothing is
    # signed, so the concurrency slot must not stay taken until the TTL ends.
    subject = f"cap-{time.time_ns()}"

    async def late(self: Ledger, record: object, *, deadline: float) -> None:
        raise Unavailable("redis", "the write reached Redis after its deadline")

    with monkeypatch.context() as patched:
        patched.setattr(Ledger, "issue", late)
        for _ in range(3):  # more than the cap
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))).allowed


async def test_the_ceiling_clips_a_longer_request(rig: Rig) -> None:
    decision = await _decide(rig, "orders-replica", ttl_seconds=3600)
    assert decision.expires_at.seconds - decision.issued_at.seconds == 300


# The operator revokes by grant, subject or connection.


async def _operator_revoke(rig: Rig, **target: str) -> policy_pb2.RevokeGrantsResponse:
    async with channel(rig.dev, "operator", rig.port, "policy") as ch:
        response: policy_pb2.RevokeGrantsResponse = await policy_pb2_grpc.PolicyStub(
            ch
        ).RevokeGrants(policy_pb2.RevokeGrantsRequest(reason="incident 42", **target), timeout=5)
        return response


async def test_the_operator_revokes_every_grant_of_a_subject(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    subject = f"sub-{time.time_ns()}"
    mine = [await _decide(rig, "orders-replica", assertion=_assertion(subject)) for _ in range(3)]
    other = await _decide(rig, "orders-replica", assertion=_assertion(f"other-{subject}"))
    pubsub = redis_admin.pubsub()
    pubsub.subscribe(grants.REVOCATION_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    started = time.monotonic()
    response = await _operator_revoke(rig, subject=subject)
    assert sorted(response.grant_ids) == sorted(d.grant_id for d in mine)
    announced = set()
    while len(announced) < 3 and time.monotonic() - started < 1.0:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "message":
            announced.add(message["data"].decode())
    assert announced == {d.grant_id for d in mine}  # every proxy hears within a second
    pubsub.close()
    for decision in mine:
        assert redis_admin.exists(grants.revoked_key(decision.grant_id))
    assert not redis_admin.exists(grants.revoked_key(other.grant_id))
    revocations = [e.revocation for _, e in rig.audit.events if e.HasField("revocation")]
    assert {r.grant_id for r in revocations} == {d.grant_id for d in mine}
    assert {r.actor for r in revocations} == {"spiffe://jitgate/operator"}
    assert {r.reason for r in revocations} == {"incident 42"}
    # Again: nothing left to revoke, nothing recorded twice.
    assert list((await _operator_revoke(rig, subject=subject)).grant_ids) == []
    assert len([e for _, e in rig.audit.events if e.HasField("revocation")]) == 3


async def test_the_operator_revokes_every_grant_of_a_connection(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    before = await _operator_revoke(rig, connection="orders-replica")  # a clean slate
    del before
    decisions = [
        await _decide(rig, "orders-replica", assertion=_assertion(f"c-{n}")) for n in range(3)
    ]
    kept = await _decide(rig, "ledger-admin", reason="r", assertion=_assertion("c-0"))
    response = await _operator_revoke(rig, connection="orders-replica")
    assert sorted(response.grant_ids) == sorted(d.grant_id for d in decisions)
    assert not redis_admin.exists(grants.revoked_key(kept.grant_id))


async def test_the_operator_revokes_one_grant_and_an_unknown_one_is_not_found(rig: Rig) -> None:
    decision = await _decide(rig, "orders-replica")
    response = await _operator_revoke(rig, grant_id=decision.grant_id)
    assert list(response.grant_ids) == [decision.grant_id]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _operator_revoke(rig, grant_id="cd" * 16)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "target",
    [{}, {"grant_id": "nope"}, {"subject": "bad\nname"}, {"connection": "Bad Name"}],
)
async def test_a_bad_revocation_target_is_invalid_argument(
    rig: Rig, target: dict[str, str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _operator_revoke(rig, **target)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("who", ["issuer", "proxy", "auditor", "verifier"])
async def test_only_the_operator_revokes_in_bulk(rig: Rig, who: str) -> None:
    async with channel(rig.dev, who, rig.port, "policy") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).RevokeGrants(
                policy_pb2.RevokeGrantsRequest(subject="deploy-bot"), timeout=5
            )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


# The operator lists live grants: of a subject, a connection, or all of them.


async def _operator_list(rig: Rig, **request: object) -> policy_pb2.LiveGrants:
    async with channel(rig.dev, "operator", rig.port, "policy") as ch:
        response: policy_pb2.LiveGrants = await policy_pb2_grpc.PolicyStub(ch).ListLiveGrants(
            policy_pb2.ListLiveGrantsRequest(**request), timeout=5
        )
        return response


async def test_the_operator_lists_a_subjects_live_grants_soonest_expiry_first(rig: Rig) -> None:
    subject = f"list-{time.time_ns()}"
    longer = await _decide(rig, "orders-replica", ttl_seconds=240, assertion=_assertion(subject))
    shorter = await _decide(rig, "orders-replica", ttl_seconds=120, assertion=_assertion(subject))
    ssh = await _decide(
        rig, "ledger-admin", ttl_seconds=180, reason="r", assertion=_assertion(subject)
    )
    revoked = await _decide(rig, "orders-replica", ttl_seconds=60, assertion=_assertion(subject))
    await _operator_revoke(rig, grant_id=revoked.grant_id)
    await _decide(rig, "orders-replica", assertion=_assertion(f"other-{subject}"))
    listed = await _operator_list(rig, subject=subject)
    assert [g.grant_id for g in listed.grants] == [
        shorter.grant_id,
        ssh.grant_id,
        longer.grant_id,
    ]
    assert not listed.truncated
    first = listed.grants[0]
    assert (first.subject, first.client_id) == (subject, subject)
    assert (first.connection, first.connection_kind) == ("orders-replica", "postgres")
    assert first.issued_at == shorter.issued_at
    assert first.expires_at == shorter.expires_at
    assert listed.grants[1].connection_kind == "ssh"


async def test_the_operator_lists_a_connections_or_every_connections_live_grants(
    rig: Rig,
) -> None:
    subject = f"list-{time.time_ns()}"
    orders = await _decide(rig, "orders-replica", assertion=_assertion(subject))
    ledger = await _decide(rig, "ledger-admin", reason="r", assertion=_assertion(subject))
    by_connection = await _operator_list(rig, connection="ledger-admin")
    assert ledger.grant_id in [g.grant_id for g in by_connection.grants]
    assert {g.connection for g in by_connection.grants} == {"ledger-admin"}
    everything = await _operator_list(rig)
    assert {orders.grant_id, ledger.grant_id} <= {g.grant_id for g in everything.grants}
    expiries = [g.expires_at.ToNanoseconds() for g in everything.grants]
    assert expiries == sorted(expiries)


async def test_a_listing_over_its_limit_keeps_the_soonest_and_says_it_is_truncated(
    rig: Rig,
) -> None:
    subject = f"list-{time.time_ns()}"
    ids = [
        (await _decide(rig, "orders-replica", ttl_seconds=ttl, assertion=_assertion(subject)))
        for ttl in (200, 100, 300)
    ]
    listed = await _operator_list(rig, subject=subject, limit=2)
    assert [g.grant_id for g in listed.grants] == [ids[1].grant_id, ids[0].grant_id]
    assert listed.truncated
    assert not (await _operator_list(rig, subject=subject, limit=3)).truncated


async def test_every_connections_listing_keeps_the_soonest_across_indexes(rig: Rig) -> None:
    # Two connection indexes, more grants than the limit: the soonest of both,
    # merged, as if they were one list (other tests' grants are there too).
    subject = f"list-{time.time_ns()}"
    decided = [
        await _decide(rig, "orders-replica", ttl_seconds=ttl, assertion=_assertion(subject))
        for ttl in (40, 60, 80)
    ] + [
        await _decide(
            rig, "ledger-admin", ttl_seconds=ttl, reason="r", assertion=_assertion(subject)
        )
        for ttl in (50, 70)
    ]
    everything = await _operator_list(rig)
    assert not everything.truncated  # this module's Redis holds far fewer than 1,000
    expected = sorted(everything.grants, key=lambda g: (g.expires_at.ToNanoseconds(), g.grant_id))
    assert list(everything.grants) == expected
    mine = [g.grant_id for g in everything.grants if g.subject == subject]
    by_expiry = sorted(decided, key=lambda d: d.expires_at.ToNanoseconds())
    assert mine == [d.grant_id for d in by_expiry]
    first = await _operator_list(rig, limit=len(everything.grants) - 1)
    assert first.truncated
    assert list(first.grants) == expected[:-1]
    assert not (await _operator_list(rig, limit=len(everything.grants))).truncated


async def test_a_revoked_grant_still_in_an_index_is_not_listed(
    rig: Rig, redis_admin: redis.Redis
) -> None:
    # As a revocation racing the listing would leave it (or one made before
    # revocations took grants out of the indexes).
    subject = f"list-{time.time_ns()}"
    decision = await _decide(rig, "orders-replica", assertion=_assertion(subject))
    await _operator_revoke(rig, grant_id=decision.grant_id)
    expiry_ms = decision.expires_at.ToMilliseconds()
    redis_admin.zadd(grants.subject_index_key(subject), {decision.grant_id: expiry_ms})
    assert not (await _operator_list(rig, subject=subject)).grants


@pytest.mark.parametrize("target", [{"subject": "bad\nname"}, {"connection": "Bad Name"}])
async def test_a_bad_listing_target_is_invalid_argument(rig: Rig, target: dict[str, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _operator_list(rig, **target)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("who", ["issuer", "proxy", "auditor", "verifier"])
async def test_only_the_operator_lists_live_grants(rig: Rig, who: str) -> None:
    async with channel(rig.dev, who, rig.port, "policy") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.PolicyStub(ch).ListLiveGrants(
                policy_pb2.ListLiveGrantsRequest(), timeout=5
            )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


# Redeem and ReportSession: the proxy's only way into the audit log.


def _token(key: Ed25519PrivateKey = POLICY_KEY, **claims: object) -> str:
    """A grant token signed here, by default with the policy's own key."""
    now = int(time.time())
    body = {
        "aud": AUDIENCE,
        "sub": "deploy-bot",
        "jti": "ab" * 16,
        "con": "orders-replica",
        "knd": "postgres",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
    }
    return grants.token_signer(key, "jitgate").sign(body | claims)


def _redeem_request(
    token: str, connection: str = "orders-replica", **fields: str
) -> policy_pb2.RedeemRequest:
    return policy_pb2.RedeemRequest(
        grant_token=token,
        connection=connection,
        session_id=fields.get("session_id", "0123abcd-ef"),
        client_address=fields.get("client_address", "192.0.2.7:51234"),
    )


async def _redeem(
    rig: Rig, token: str, connection: str = "orders-replica", *, who: str = "proxy", **fields: str
) -> policy_pb2.RedeemResponse:
    async with channel(rig.dev, who, rig.port, "policy") as ch:
        response: policy_pb2.RedeemResponse = await policy_pb2_grpc.PolicyStub(ch).Redeem(
            _redeem_request(token, connection, **fields), timeout=5
        )
        return response


async def _refused(rig: Rig, token: str, connection: str = "orders-replica") -> str:
    """Redeem, expecting PERMISSION_DENIED; return its reason."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _redeem(rig, token, connection)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return _denial(raised.value)[0]


def _report(grant: policy_pb2.Decision, **fields: object) -> policy_pb2.SessionReport:
    now = time.time()
    report = policy_pb2.SessionReport(
        grant_id=grant.grant_id,
        session_id="0123abcd-ef",
        connection=grant.connection,
        reason="client_closed",
        bytes_from_client=1234,
        bytes_to_client=56789,
        opened_at=wire.timestamp(now - 30),
        closed_at=wire.timestamp(now),
    )
    for name, value in fields.items():
        if value is None:
            report.ClearField(name)
        elif isinstance(value, Timestamp):
            getattr(report, name).CopyFrom(value)
        else:
            setattr(report, name, value)
    return report


async def _report_session(
    rig: Rig, report: policy_pb2.SessionReport, *, who: str = "proxy"
) -> policy_pb2.SessionReportAck:
    async with channel(rig.dev, who, rig.port, "policy") as ch:
        ack: policy_pb2.SessionReportAck = await policy_pb2_grpc.PolicyStub(ch).ReportSession(
            report, timeout=5
        )
        return ack


async def test_redeem_records_the_redemption_then_answers_with_the_ledgers_grant(
    rig: Rig,
) -> None:
    grant = await _granted(rig)
    redeemed = await _redeem(rig, grant.grant_token)
    assert (redeemed.grant_id, redeemed.subject, redeemed.connection) == (
        grant.grant_id,
        "deploy-bot",
        "orders-replica",
    )
    assert redeemed.connection_kind == "postgres"
    assert redeemed.expires_at == grant.expires_at
    [(who, event)] = rig.audit.events
    assert who == "policy"
    assert event.redemption == audit_pb2.GrantRedeemed(
        grant_id=grant.grant_id,
        subject="deploy-bot",
        connection="orders-replica",
        session_id="0123abcd-ef",
        expires_at=grant.expires_at,
        client_address="192.0.2.7:51234",
    )


async def test_a_grant_for_another_connection_is_refused_unrecorded(rig: Rig) -> None:
    grant = await _granted(rig)
    assert await _refused(rig, grant.grant_token, "billing-primary") == "WRONG_CONNECTION"
    assert not rig.audit.events


async def test_a_revoked_grant_is_refused(rig: Rig) -> None:
    grant = await _granted(rig)
    await _revoke(rig, grant.grant_id)
    rig.audit.events.clear()
    assert await _refused(rig, grant.grant_token) == "GRANT_REVOKED"
    assert not rig.audit.events


async def test_an_expired_grant_is_refused(rig: Rig) -> None:
    grant = await _decide(rig, "orders-replica", ttl_seconds=1)
    rig.audit.events.clear()
    # No leeway: the token's exp (whole seconds) is the last moment it redeems.
    await asyncio.sleep(max(0.0, grant.expires_at.seconds - time.time()) + 0.1)
    assert await _refused(rig, grant.grant_token) == "GRANT_EXPIRED"
    assert await _refused(rig, _token(exp=int(time.time()) - 1)) == "GRANT_EXPIRED"
    assert not rig.audit.events


def _tampered(token: str, **claims: object) -> str:
    """token with its payload rewritten and its signature kept."""
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps(body | claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    "forge",
    [
        # Another key, with the claims of a real grant.
        lambda g: _token(Ed25519PrivateKey.generate(), jti=g.grant_id),
        # A real grant with its subject, or its expiry, rewritten.
        lambda g: _tampered(g.grant_token, sub="root"),
        lambda g: _tampered(g.grant_token, exp=int(time.time()) + 3600),
        # Signed by policy, but never issued: the ledger does not know it.
        lambda g: _token(jti="cd" * 16),
        # Signed by policy, but the ledger's record of the grant says otherwise.
        lambda g: _token(jti=g.grant_id, sub="someone-else"),
        # Signed by policy for another audience, or as another kind of token.
        lambda g: _token(jti=g.grant_id, aud="spiffe://jitgate/elsewhere"),
        lambda g: _assertion(),
        lambda g: _token(jti="not-a-grant-id"),
        lambda g: "not-a-jwt",
        lambda g: "a.b.c",
        lambda g: "é" * 100,
    ],
)
async def test_a_token_policy_did_not_sign_as_is_refused_as_invalid(
    rig: Rig, forge: Callable[[policy_pb2.Decision], str]
) -> None:
    grant = await _granted(rig)
    assert await _refused(rig, forge(grant)) == "GRANT_INVALID"
    assert not rig.audit.events


async def test_a_forged_kid_does_not_borrow_the_policy_key(rig: Rig) -> None:
    grant = await _granted(rig)
    forged = _token(Ed25519PrivateKey.generate(), jti=grant.grant_id)
    # The forger's claims and signature under the real token's header (its kid).
    real_header = grant.grant_token.split(".")[0]
    _, payload, signature = forged.split(".")
    assert await _refused(rig, f"{real_header}.{payload}.{signature}") == "GRANT_INVALID"
    assert not rig.audit.events


@pytest.mark.parametrize("mode", ["fail", "stall"])
async def test_audit_down_means_unavailable_and_no_redemption(rig: Rig, mode: str) -> None:
    grant = await _granted(rig)
    rig.audit.mode = mode
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _redeem(rig, grant.grant_token)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.5  # the audit deadline here is 0.5 s
    assert not rig.audit.events


@pytest.mark.parametrize("who", ["issuer", "operator", "verifier", "auditor"])
async def test_only_the_proxy_redeems_and_reports(rig: Rig, who: str) -> None:
    grant = await _granted(rig)
    for call in (
        lambda: _redeem(rig, grant.grant_token, who=who),
        lambda: _report_session(rig, _report(grant), who=who),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not rig.audit.events


@pytest.mark.parametrize(
    ("connection", "fields", "field"),
    [
        ("", {}, "connection"),
        ("Orders Replica", {}, "connection"),
        ("orders-replica", {"session_id": ""}, "session_id"),
        ("orders-replica", {"session_id": "x" * 65}, "session_id"),
        ("orders-replica", {"session_id": "a b"}, "session_id"),
        ("orders-replica", {"session_id": "sé"}, "session_id"),
        ("orders-replica", {"client_address": "x" * 129}, "client_address"),
        ("orders-replica", {"client_address": "1.2.3.4\n5"}, "client_address"),
        ("orders-replica", {"client_address": "\x1b[31m"}, "client_address"),
    ],
)
async def test_a_malformed_redemption_is_invalid_argument(
    rig: Rig, connection: str, fields: dict[str, str], field: str
) -> None:
    grant = await _granted(rig)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _redeem(rig, grant.grant_token, connection, **fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
    assert not rig.audit.events


@pytest.mark.parametrize("token", ["", "x" * (MAX_TOKEN_BYTES + 1)])
async def test_a_missing_or_oversized_token_is_invalid_argument(rig: Rig, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _redeem(rig, token)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grant_token" in (raised.value.details() or "")


@pytest.mark.parametrize("method", ["Redeem", "ReportSession"])
@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",
        b"\x0a\x01\xff",  # field 1 (a string) that is not UTF-8
        b"\x42\x03\x08\x80\x80",  # field 8 holding a truncated varint
    ],
)
async def test_garbage_bytes_are_invalid_argument_never_internal(
    rig: Rig, method: str, data: bytes
) -> None:
    async with channel(rig.dev, "proxy", rig.port, "policy") as ch:
        call = ch.unary_unary(
            f"/jitgate.v1.Policy/{method}", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(data, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_report_session_records_the_end_with_the_ledgers_subject(rig: Rig) -> None:
    grant = await _granted(rig)
    await _redeem(rig, grant.grant_token)
    report = _report(grant, reason="expired")
    await _report_session(rig, report)
    assert rig.audit.kinds() == ["redemption", "session_closed"]
    who, event = rig.audit.events[1]
    assert who == "policy"
    assert event.session_closed == audit_pb2.SessionClosed(
        grant_id=grant.grant_id,
        session_id="0123abcd-ef",
        subject="deploy-bot",
        connection="orders-replica",
        reason="expired",
        bytes_from_client=1234,
        bytes_to_client=56789,
        opened_at=report.opened_at,
    )


async def test_a_reported_time_reaches_audit_without_fields_unknown_to_it(rig: Rig) -> None:
    # opened_at (field 7) again, holding field 15, which no Timestamp has: the
    # parser keeps it as an unknown field. Passed on as it came, audit would
    # refuse the record and the proxy would be told audit is unavailable.
    grant = await _granted(rig)
    report = _report(grant)
    sent = report.SerializeToString() + b"\x3a\x02\x78\x01"
    async with channel(rig.dev, "proxy", rig.port, "policy") as ch:
        call = ch.unary_unary(
            "/jitgate.v1.Policy/ReportSession",
            request_serializer=lambda b: b,
            response_deserializer=policy_pb2.SessionReportAck.FromString,
        )
        await call(sent, timeout=5)
    [(_, event)] = rig.audit.events
    clean = Timestamp(seconds=report.opened_at.seconds, nanos=report.opened_at.nanos)
    assert event.session_closed.opened_at.SerializeToString() == clean.SerializeToString()


async def test_a_session_of_a_revoked_grant_is_still_reported(rig: Rig) -> None:
    # The ledger keeps a revoked grant's record, so its session's end is recorded too.
    grant = await _granted(rig)
    await _revoke(rig, grant.grant_id)
    await _report_session(rig, _report(grant, reason="revoked"))
    assert rig.audit.kinds() == ["revocation", "session_closed"]


async def test_a_report_on_a_grant_policy_did_not_sign_is_not_found(rig: Rig) -> None:
    grant = await _granted(rig)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _report_session(rig, _report(grant, grant_id="cd" * 16))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert not rig.audit.events


async def test_a_report_naming_another_connection_is_refused(rig: Rig) -> None:
    grant = await _granted(rig)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _report_session(rig, _report(grant, connection="billing-primary"))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _denial(raised.value)[0] == "WRONG_CONNECTION"
    assert not rig.audit.events


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"reason": "bored"}, "reason"),
        ({"reason": ""}, "reason"),
        ({"reason": "EXPIRED"}, "reason"),
        ({"grant_id": "nope"}, "grant_id"),
        ({"grant_id": ""}, "grant_id"),
        ({"session_id": "a/b"}, "session_id"),
        ({"connection": "Bad Name"}, "connection"),
        ({"opened_at": None}, "opened_at"),
        ({"closed_at": None}, "closed_at"),
        ({"opened_at": Timestamp(seconds=2**62)}, "opened_at"),
        ({"closed_at": Timestamp(seconds=-(2**62))}, "closed_at"),
        ({"opened_at": Timestamp(seconds=1, nanos=-1)}, "opened_at"),
        ({"opened_at": wire.timestamp(time.time() + 3600)}, "closed_at"),
    ],
)
async def test_a_malformed_report_is_invalid_argument(
    rig: Rig, fields: dict[str, object], field: str
) -> None:
    grant = await _granted(rig)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _report_session(rig, _report(grant, **fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")
    assert not rig.audit.events


async def test_report_session_with_audit_down_is_unavailable(rig: Rig) -> None:
    grant = await _granted(rig)
    rig.audit.mode = "fail"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _report_session(rig, _report(grant))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
