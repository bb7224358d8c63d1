"""Rotating the grant-signing key of the running policy service, as a proxy sees it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitgate import client as sdk
from jitgate.common import grants, tls, wire
from jitgate.devstack.stack import Stack
from jitgate.policy import keyring
from jitgate.v1 import policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.e2e
SEEN_WITHIN = 15.0
"""The policy service looks at the manifest at most once a second; ample on a slow machine."""


def _grant_keys(stack: Stack, caller: str = "proxy") -> policy_pb2.GrantKeys:
    """GetGrantKeys over mTLS as caller (the proxy: the one caller allowed)."""
    credentials = tls.channel_credentials(stack.pki.files(caller))
    options = [("grpc.ssl_target_name_override", "policy")]
    with grpc.secure_channel(stack.address("policy"), credentials, options=options) as channel:
        reply: policy_pb2.GrantKeys = policy_pb2_grpc.PolicyStub(channel).GetGrantKeys(
            policy_pb2.GetGrantKeysRequest(), timeout=10
        )
    return reply


def _grant_token(stack: Stack) -> str:
    """A grant token for deploy-bot through issuer, verifier and policy."""
    with sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca, timeout=10
    ) as agent:
        return agent.request_grant("orders-replica", ttl_seconds=60).token


def _verified_kid(published: policy_pb2.GrantKeys, token: str) -> str:
    """Check token as a proxy does, with only the published keys; return its kid."""
    checker = grants.token_checker(
        [Ed25519PublicKey.from_public_bytes(k.public_key) for k in published.keys],
        audience="spiffe://jitgate/proxy",
        trust_domain="jitgate",
    )
    checker.check(token, time.time())
    return str(jwt.get_unverified_header(token)["kid"])


def _keys_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitgate", "keys", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SEEN_WITHIN
    while not done():
        assert time.monotonic() < deadline, f"not seen within {SEEN_WITHIN}s: {what}"
        time.sleep(0.2)


def test_the_proxy_fetches_the_keys_that_verify_grants(stack: Stack) -> None:
    [entry] = keyring.read_manifest(stack.policy_keys)
    published = _grant_keys(stack)
    assert [(k.kid, k.signing) for k in published.keys] == [(entry.kid, True)]
    [jwk] = json.loads(published.jwks)["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("OKP", "Ed25519", entry.kid)
    assert _verified_kid(published, _grant_token(stack)) == entry.kid


def test_only_the_proxy_may_fetch_them(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _grant_keys(stack, caller="issuer")
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_rotation_publishes_ahead_then_signs_with_no_restart(stack: Stack) -> None:
    pid = stack.processes["policy"].pid
    [old] = _grant_keys(stack).keys
    before = _grant_token(stack)

    # 1. A held rotation: the new key is published, the old one still signs.
    added = _keys_cli("rotate", str(stack.policy_keys), "--hold", "--ttl-ceiling", "15m")
    assert added.returncode == 0, added.stderr
    _until(lambda: len(_grant_keys(stack).keys) == 2, "the next key published")
    published = _grant_keys(stack)
    new_kid = published.keys[1].kid
    assert [(k.kid, k.signing) for k in published.keys] == [(old.kid, True), (new_kid, False)]
    assert _verified_kid(published, _grant_token(stack)) == old.kid

    # 2. Every proxy has it (seen above), so it may sign at once.
    activated = _keys_cli(
        "rotate",
        str(stack.policy_keys),
        "--activate",
        "--publish-ahead",
        "0",
        "--ttl-ceiling",
        "15m",
    )
    assert activated.returncode == 0, activated.stderr
    _until(lambda: _grant_keys(stack).keys[0].kid == new_kid, "the new key signing")
    published = _grant_keys(stack)
    assert [(k.kid, k.signing) for k in published.keys] == [(new_kid, True), (old.kid, False)]
    after = _grant_token(stack)
    assert _verified_kid(published, after) == new_kid
    # A grant the old key signed still verifies, and will until it expires.
    assert _verified_kid(published, before) == old.kid
    retire_at = wire.seconds(published.keys[1].retire_at)
    assert retire_at >= jwt.decode(before, options={"verify_signature": False})["exp"] + 60
    assert retire_at >= time.time() + 15 * 60

    # Its retirement, minutes from now, is tests/policy/test_keyring.py's, on a fake clock.
    assert stack.processes["policy"].pid == pid
    assert stack.processes["policy"].poll() is None
    assert "grant tokens are signed with kid " + new_kid in (stack.logs / "policy.log").read_text()
