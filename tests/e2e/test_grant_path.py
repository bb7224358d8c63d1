"""The grant path across real processes: issuer, verifier, policy, audit, Redis, dev IdP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
import redis
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from jitgate import client as sdk
from jitgate.audit.chain import verify_database
from jitgate.common import grants, tls
from jitgate.devstack.pki import DevPki
from jitgate.devstack.stack import Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, policy_pb2, policy_pb2_grpc
from tests.e2e.conftest import audit_records, mint

pytestmark = pytest.mark.e2e


def _agent(stack: Stack, token: str) -> sdk.IssuerClient:
    return sdk.IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca)


def test_every_service_reports_serving(stack: Stack) -> None:
    names = ("audit", "verifier", "policy", "issuer")
    assert {name: stack.health(name) for name in names} == dict.fromkeys(names, "SERVING")


def test_a_grant_from_request_to_revocation(stack: Stack, redis_admin: redis.Redis) -> None:
    with _agent(stack, stack.token("deploy-bot")) as agent:
        grant = agent.request_grant("orders-replica", ttl_seconds=120, reason="slow order queries")
        assert grant.subject == "deploy-bot"
        assert 115 <= (grant.expires_at - grant.issued_at).total_seconds() <= 120
        ttl_ms = redis_admin.pttl(grants.grant_key(grant.grant_id))
        assert 0 < ttl_ms <= 120_000
        assert [g.grant_id for g in agent.list_grants()] == [grant.grant_id]
        agent.revoke_grant(grant.grant_id, reason="done")
        assert agent.list_grants() == []
    assert redis_admin.exists(grants.revoked_key(grant.grant_id))
    records = audit_records(stack)
    decisions = [r for r in records if r.event.decision.grant_id == grant.grant_id]
    assert len(decisions) == 1
    assert decisions[0].caller == "spiffe://jitgate/policy"
    assert decisions[0].event.decision.identity.subject == "deploy-bot"
    assert decisions[0].event.decision.request_reason == "slow order queries"
    revocations = [r for r in records if r.event.revocation.grant_id == grant.grant_id]
    assert len(revocations) == 1
    assert decisions[0].index < revocations[0].index
    report = verify_database(stack.audit_db)
    assert report.intact, report.reason
    assert report.count == len(records)


def test_a_denial_is_recorded_with_its_reason(stack: Stack) -> None:
    with _agent(stack, stack.token("deploy-bot")) as agent, pytest.raises(sdk.Denied) as raised:
        agent.request_grant("billing-primary")
    assert raised.value.reason == "NO_BINDING"
    last = audit_records(stack)[-1].event.decision
    assert (last.connection, last.allowed, last.reason_code) == (
        "billing-primary",
        False,
        "NO_BINDING",
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": "api://someone-else"}, "aud_mismatch"),
        ({"iss": "https://evil.example/oauth2/default"}, "iss_mismatch"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
    ],
)
def test_a_bad_token_is_unauthenticated_and_audited(
    stack: Stack, redis_admin: redis.Redis, overrides: dict[str, object], reason: str
) -> None:
    before = set(redis_admin.keys("grant:*"))
    with (
        _agent(stack, mint(stack, **overrides)) as agent,
        pytest.raises(sdk.Unauthenticated) as raised,
    ):
        agent.request_grant("orders-replica")
    assert str(raised.value) == "authentication failed"
    assert set(redis_admin.keys("grant:*")) == before
    last = audit_records(stack)[-1]
    assert last.caller == "spiffe://jitgate/verifier"
    assert last.event.WhichOneof("kind") == "token_rejected"
    assert last.event.token_rejected.reason == reason


def test_a_token_expired_within_the_leeway_is_told_to_renew(stack: Stack) -> None:
    # The verifier allows 30 s of clock skew; such a token is not a grant's worth.
    now = int(time.time())
    token = mint(stack, exp=now - 10, iat=now - 600)
    with _agent(stack, token) as agent, pytest.raises(sdk.Denied) as raised:
        agent.request_grant("orders-replica")
    assert raised.value.reason == "TOKEN_EXPIRING"


def test_a_token_signed_by_another_key_is_unauthenticated(stack: Stack) -> None:
    from jitgate.devstack.demo import _forged_token

    with (
        _agent(stack, _forged_token(stack.token("deploy-bot"))) as agent,
        pytest.raises(sdk.Unauthenticated),
    ):
        agent.request_grant("orders-replica")


def test_the_issuer_certificate_cannot_write_to_audit(stack: Stack) -> None:
    credentials = tls.channel_credentials(stack.pki.files("issuer"))
    options = [("grpc.ssl_target_name_override", "audit")]
    with grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel:
        stub = audit_pb2_grpc.AuditStub(channel)
        event = audit_pb2.AuditEvent(
            decision=audit_pb2.DecisionRecorded(allowed=True, grant_id="x")
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Append(audit_pb2.AppendRequest(event=event), timeout=5)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Read(audit_pb2.ReadRequest(), timeout=5))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("caller", ["verifier", "proxy", "operator"])
@pytest.mark.parametrize("method", ["Decide", "Revoke"])
def test_only_the_issuer_may_ask_policy(stack: Stack, caller: str, method: str) -> None:
    credentials = tls.channel_credentials(stack.pki.files(caller))
    options = [("grpc.ssl_target_name_override", "policy")]
    request = policy_pb2.DecideRequest() if method == "Decide" else policy_pb2.RevokeRequest()
    with grpc.secure_channel(stack.address("policy"), credentials, options=options) as channel:
        call = getattr(policy_pb2_grpc.PolicyStub(channel), method)
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_certificate_from_another_ca_never_reaches_audit(
    stack: Stack, foreign_pki: DevPki
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=stack.pki.ca.read_bytes(),
        private_key=foreign_pki.files("policy").key.read_bytes(),
        certificate_chain=foreign_pki.files("policy").cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "audit")]
    with (
        grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        audit_pb2_grpc.AuditStub(channel).Append(audit_pb2.AppendRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def _cli(stack: Stack, token: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.client_env(), "JITGATE_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "jitgate", "grant", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_exit_codes_tell_outcomes_apart(stack: Stack) -> None:
    token = stack.token("deploy-bot")
    allowed = _cli(stack, token, "request", "orders-replica", "--ttl", "60", "--json")
    assert allowed.returncode == 0, allowed.stderr
    grant = json.loads(allowed.stdout)
    assert grant["connection"] == "orders-replica"
    assert grant["token"]
    listed = _cli(stack, token, "list", "--json")
    assert grant["grant_id"] in [g["grant_id"] for g in json.loads(listed.stdout)]
    denied = _cli(stack, token, "request", "billing-primary", "--json")
    assert denied.returncode == 3
    assert json.loads(denied.stdout)["reason"] == "NO_BINDING"
    assert _cli(stack, "garbage", "list").returncode == 4
    assert _cli(stack, token, "get", "0" * 32).returncode == 6
    assert _cli(stack, token, "request", "Not A Name").returncode == 2
    assert _cli(stack, token, "revoke", grant["grant_id"]).returncode == 0


def _operator(
    stack: Stack, *argv: str, action: str = "revoke", who: str = "operator"
) -> subprocess.CompletedProcess[str]:
    files = stack.pki.files(who)
    env = {
        **os.environ,
        "JITGATE_TLS_CA": str(files.ca),
        "JITGATE_TLS_CERT": str(files.cert),
        "JITGATE_TLS_KEY": str(files.key),
        "JITGATE_POLICY_ADDR": stack.address("policy"),
    }
    env.pop("JITGATE_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "jitgate", "grant", action, *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )


def test_the_operator_revokes_all_grants_of_a_subject(stack: Stack) -> None:
    token = stack.token("deploy-bot")
    with _agent(stack, token) as agent:
        granted = {agent.request_grant("orders-replica", ttl_seconds=60).grant_id for _ in range(2)}
        assert granted <= {g.grant_id for g in agent.list_grants()}
        done = _operator(stack, "--subject", "deploy-bot", "--reason", "incident 7", "--json")
        assert done.returncode == 0, done.stderr
        assert granted <= set(json.loads(done.stdout)["revoked"])
        # Gone from the agent's view at once, though their tokens have not expired.
        assert not granted & {g.grant_id for g in agent.list_grants()}
    revocations = [
        r.event.revocation for r in audit_records(stack) if r.event.HasField("revocation")
    ]
    mine = [r for r in revocations if r.grant_id in granted]
    assert len(mine) == 2
    assert {(r.actor, r.reason) for r in mine} == {("spiffe://jitgate/operator", "incident 7")}
    assert {r.caller for r in audit_records(stack) if r.event.HasField("revocation")} == {
        "spiffe://jitgate/policy"
    }


def test_the_operator_lists_live_grants_without_their_tokens(stack: Stack) -> None:
    token = stack.token("deploy-bot")
    with _agent(stack, token) as agent:
        grant = agent.request_grant("orders-replica", ttl_seconds=60)
        listed = _operator(stack, "--subject", "deploy-bot", "--json", action="live")
        assert listed.returncode == 0, listed.stderr
        rows = {row["grant_id"]: row for row in json.loads(listed.stdout)["grants"]}
        row = rows[grant.grant_id]
        assert (row["subject"], row["connection"]) == ("deploy-bot", "orders-replica")
        assert row["expires_at"] == f"{grant.expires_at:%Y-%m-%dT%H:%M:%SZ}"
        assert grant.token not in listed.stdout
        text = _operator(stack, "--connection", "orders-replica", action="live")
        assert text.returncode == 0, text.stderr
        assert grant.grant_id in text.stdout
        assert text.stdout.rstrip().endswith("live grant(s)")
        agent.revoke_grant(grant.grant_id, reason="done")
        after = _operator(stack, "--subject", "deploy-bot", "--json", action="live")
        assert grant.grant_id not in after.stdout
    # Another workload's certificate is refused, as for revocation.
    assert _operator(stack, action="live", who="issuer").returncode == 3


def test_only_the_operator_certificate_may_revoke_in_bulk(stack: Stack) -> None:
    files = stack.pki.files("issuer")
    done = subprocess.run(
        [sys.executable, "-m", "jitgate", "grant", "revoke", "--connection", "orders-replica"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "JITGATE_TLS_CA": str(files.ca),
            "JITGATE_TLS_CERT": str(files.cert),
            "JITGATE_TLS_KEY": str(files.key),
            "JITGATE_POLICY_ADDR": stack.address("policy"),
        },
        check=False,
        timeout=30,
    )
    assert done.returncode == 3, done.stderr


def test_the_issuer_serves_reflection_for_grpcurl(stack: Stack) -> None:
    channel = grpc.secure_channel(
        stack.address("issuer"), grpc.ssl_channel_credentials(stack.pki.ca.read_bytes())
    )
    try:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "jitgate.v1.Issuer" in set(database.get_services())
        issuer = database.FindFileContainingSymbol("jitgate.v1.Issuer")
        assert "RequestGrant" in str(issuer)
    finally:
        channel.close()
