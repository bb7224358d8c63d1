"""One real stack per module: separate processes, mTLS, a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from jitgate.audit import verify
from jitgate.audit.checkpoint import parse_verifier_key
from jitgate.audit.store import SqliteStore, iter_checkpoints, iter_records
from jitgate.common import tls
from jitgate.devstack import idp
from jitgate.devstack.stack import Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, policy_pb2, policy_pb2_grpc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, started as `jitgate up` starts it, stopped after the module."""
    running = Stack(tmp_path_factory.mktemp("stack"))
    running.start()
    yield running
    running.stop()


@pytest.fixture
def redis_admin(stack: Stack) -> Iterator[redis.Redis]:
    """An admin connection to the stack's Redis, for looking, not for changing."""
    client = redis.Redis.from_url(stack.redis_url("admin"))
    yield client
    client.close()


def mint(stack: Stack, **overrides: Any) -> str:
    """A token signed with the dev IdP's real key: good, or wrong in one way."""
    key = idp.load_or_create_key(stack.state / "idp")
    now = int(time.time())
    claims = {
        "ver": 1,
        "jti": f"AT.test{now}",
        "iss": stack.oidc_issuer,
        "aud": "api://default",
        "iat": now,
        "exp": now + 600,
        "cid": "deploy-bot",
        "uid": "00utest",
        "scp": ["jitgate"],
        "sub": "deploy-bot",
        "groups": ["platform"],
        **overrides,
    }
    return idp.mint(claims, key=key, kid=idp.rsa_key_id(key.public_key()))


def verify_audit_log(stack: Stack) -> tuple[verify.Report, bytes]:
    """Verify the stack's audit log offline with its checkpoint key; also return its records."""
    verifier = parse_verifier_key(stack.audit_vkey.read_text().strip())
    store = SqliteStore.open(stack.audit_db, read_only=True)
    try:
        logged = [r.canonical for r in iter_records(store)]
        notes = [c.note for c in iter_checkpoints(store)]
    finally:
        store.close()
    report = verify.verify(logged, notes, [verifier], origin=verifier.name)
    return report, b"\n".join(logged)


def audit_records(stack: Stack) -> list[audit_pb2.AuditRecord]:
    """The stack's audit log as the auditor reads it over gRPC."""
    credentials = tls.channel_credentials(stack.pki.files("auditor"))
    options = [("grpc.ssl_target_name_override", "audit")]
    with grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel:
        return list(audit_pb2_grpc.AuditStub(channel).Read(audit_pb2.ReadRequest(), timeout=5))


def operator_revokes(stack: Stack, grant_id: str, reason: str = "incident") -> None:
    """The operator revokes the grant through the policy service."""
    credentials = tls.channel_credentials(stack.pki.files("operator"))
    options = [("grpc.ssl_target_name_override", "policy")]
    with grpc.secure_channel(stack.address("policy"), credentials, options=options) as channel:
        policy_pb2_grpc.PolicyStub(channel).RevokeGrants(
            policy_pb2.RevokeGrantsRequest(grant_id=grant_id, reason=reason), timeout=5
        )
