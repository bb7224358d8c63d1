"""Rotating the verifier's assertion key across running processes: no restart, no failed request."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate import client as sdk
from jitgate.common import assertion, keys, tls
from jitgate.common.assertion import Identity
from jitgate.devstack.stack import Stack
from jitgate.v1 import policy_pb2, policy_pb2_grpc, verifier_pb2, verifier_pb2_grpc

pytestmark = pytest.mark.e2e
SEEN_WITHIN = 15.0
"""Both services look at their key files every second; this is ample on a slow machine."""


def _issuer_channel(stack: Stack, server: str) -> grpc.Channel:
    """A channel as the issuer (the one caller both verifier and policy accept)."""
    credentials = tls.channel_credentials(stack.pki.files("issuer"))
    options = [("grpc.ssl_target_name_override", server)]
    return grpc.secure_channel(stack.address(server), credentials, options=options)


def _verify(stack: Stack, token: str) -> str:
    """The assertion the running verifier signs for token."""
    with _issuer_channel(stack, "verifier") as channel:
        reply = verifier_pb2_grpc.VerifierStub(channel).Verify(
            verifier_pb2.VerifyRequest(token=token), timeout=10
        )
    return reply.assertion


def _decide(stack: Stack, signed: str) -> grpc.StatusCode:
    """What the running policy service answers to an allowed request carrying signed."""
    request = policy_pb2.DecideRequest(
        assertion=signed, connection="orders-replica", ttl_seconds=60, reason="key rotation"
    )
    with _issuer_channel(stack, "policy") as channel:
        try:
            policy_pb2_grpc.PolicyStub(channel).Decide(request, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def _signed_by(key: Ed25519PrivateKey) -> str:
    """An assertion for deploy-bot as the verifier would sign it with key, made now."""
    now = time.time()
    identity = Identity(
        subject="deploy-bot",
        client_id="deploy-bot",
        groups=("platform",),
        token_expires_at=now + 3600,
        issuer="i",
    )
    signed, _ = assertion.sign(
        assertion.signer(key, "jitgate"), identity, trust_domain="jitgate", now=now, lifetime=60
    )
    return signed


def _kid(signed: str) -> str:
    return str(jwt.get_unverified_header(signed)["kid"])


def _grant(stack: Stack, token: str) -> None:
    """One agent request through issuer, verifier and policy; it must not fail."""
    with sdk.IssuerClient(
        stack.address("issuer"), token=token, ca_file=stack.pki.ca, timeout=10
    ) as agent:
        assert agent.request_grant("orders-replica", ttl_seconds=60).grant_id


def _until(done: Callable[[], bool], what: str) -> None:
    """Poll done until true; each poll may also send requests that must succeed."""
    deadline = time.monotonic() + SEEN_WITHIN
    while not done():
        assert time.monotonic() < deadline, f"not seen within {SEEN_WITHIN}s: {what}"
        time.sleep(0.2)


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _rename_over(path: Path, data: bytes) -> None:
    """Write a whole new file beside path, then rename it over path (atomic on POSIX)."""
    spare = path.with_name(path.name + ".new")
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(spare, path)


def test_the_verifier_key_rotates_with_no_restart_and_no_failed_request(stack: Stack) -> None:
    signing_file = stack.state / "keys" / "verifier-signing.key"
    public_file = stack.state / "keys" / "verifier-signing.pub"
    pids = {name: stack.processes[name].pid for name in ("verifier", "policy")}
    old_key = keys.load_private(signing_file)
    new_key = Ed25519PrivateKey.generate()
    new_kid = keys.key_id(new_key.public_key())
    token = stack.token("deploy-bot")

    from_old = _verify(stack, token)
    assert _kid(from_old) == keys.key_id(old_key.public_key())
    assert _decide(stack, from_old) == grpc.StatusCode.OK
    # The new key is not trusted yet.
    assert _decide(stack, _signed_by(new_key)) == grpc.StatusCode.UNAUTHENTICATED

    # 1. The policy service trusts the new key beside the old one.
    with public_file.open("ab") as out:
        out.write(_public_pem(new_key))
    _until(lambda: _decide(stack, _signed_by(new_key)) == grpc.StatusCode.OK, "new public key")
    assert _decide(stack, from_old) == grpc.StatusCode.OK

    # 2. The verifier signs with the new key; every request meanwhile succeeds.
    _rename_over(
        signing_file,
        new_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )

    def signs_with_new_key() -> bool:
        _grant(stack, token)
        return _kid(_verify(stack, token)) == new_kid

    _until(signs_with_new_key, "new signing key")
    from_new = _verify(stack, token)
    assert _decide(stack, from_new) == grpc.StatusCode.OK
    # Assertions signed before the switch are good until they expire.
    assert _decide(stack, from_old) == grpc.StatusCode.OK

    # 3. Once no old assertion can be alive, the old key goes.
    _rename_over(public_file, _public_pem(new_key))
    _until(lambda: _decide(stack, from_old) == grpc.StatusCode.UNAUTHENTICATED, "old key gone")
    assert _decide(stack, _signed_by(old_key)) == grpc.StatusCode.UNAUTHENTICATED
    assert _decide(stack, from_new) == grpc.StatusCode.OK
    _grant(stack, token)

    # The same processes did all of it.
    assert {name: stack.processes[name].pid for name in pids} == pids
    assert all(stack.processes[name].poll() is None for name in pids)


def _warned(stack: Stack, name: str) -> bool:
    return "keeping the last good version" in (stack.logs / f"{name}.log").read_text()


def test_a_broken_key_file_keeps_the_last_good_key(stack: Stack) -> None:
    signing_file = stack.state / "keys" / "verifier-signing.key"
    public_file = stack.state / "keys" / "verifier-signing.pub"
    token = stack.token("deploy-bot")
    kid = _kid(_verify(stack, token))
    good_public, good_private = public_file.read_bytes(), signing_file.read_bytes()
    try:
        _rename_over(public_file, b"not a key\n")
        _rename_over(signing_file, b"not a key either\n")

        # The files are looked at as requests come; each of these must succeed.
        def both_warned() -> bool:
            _grant(stack, token)
            return _warned(stack, "policy") and _warned(stack, "verifier")

        _until(both_warned, "warnings about the broken files")
        assert _kid(_verify(stack, token)) == kid
    finally:
        _rename_over(public_file, good_public)
        _rename_over(signing_file, good_private)
