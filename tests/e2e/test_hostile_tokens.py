"""Every token rule, through the real stack: the agent sees one answer, audit sees the reason."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.rpc import status_pb2

from jitgate.common import tls
from jitgate.common.logs import fingerprint
from jitgate.devstack import idp
from jitgate.devstack.stack import Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, issuer_pb2, issuer_pb2_grpc
from jitgate.verifier.tokens import MAX_TOKEN_BYTES, REASONS

pytestmark = pytest.mark.e2e

_DROP = object()
Build = Callable[[Stack], str]


def _b64(data: object) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _kid(stack: Stack) -> str:
    return idp.rsa_key_id(idp.load_or_create_key(stack.state / "idp").public_key())


def _claims(stack: Stack, **changes: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "jti": "AT.hostile",
        "iss": stack.oidc_issuer,
        "aud": "api://default",
        "iat": now,
        "exp": now + 600,
        "cid": "deploy-bot",
        "sub": "deploy-bot",
        "groups": ["platform"],
    }
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


def _claim(**changes: object) -> Build:
    """A token signed by the real IdP key, with claims changed (or dropped)."""
    return lambda stack: _signed(stack, _claims(stack, **changes))


def _signed(
    stack: Stack, claims: dict[str, object], *, ascii_only: bool = True, **headers: object
) -> str:
    key = idp.load_or_create_key(stack.state / "idp")
    return idp.mint(claims, key=key, kid=_kid(stack), headers=headers, ascii_only=ascii_only)


def _header(**headers: object) -> Build:
    return lambda stack: _signed(stack, _claims(stack), **headers)


def _raw_payload(payload: bytes) -> Build:
    """A correctly signed token whose payload is the given bytes, JSON object or not."""

    def build(stack: Stack) -> str:
        key = idp.load_or_create_key(stack.state / "idp")
        signing_input = f"{_b64({'alg': 'RS256', 'kid': _kid(stack)})}.{_b64(payload)}"
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    return build


def _other_key(stack: Stack) -> str:
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return idp.mint(_claims(stack), key=forger, kid=_kid(stack))


def _now() -> int:
    return int(time.time())


CASES: dict[str, Build] = {
    "token_malformed": lambda stack: "abc.d!f.ghi",
    "token_encrypted": lambda stack: ".".join(
        ["eyJhbGciOiJSU0EtT0FFUCJ9", "AAAA", "AAAA", "AAAA", "AAAA"]
    ),
    "segment_count": lambda stack: "abc.def",
    "header_malformed": lambda stack: f"{_b64([1])}.{_b64({})}.AAAA",
    "alg_not_allowed": lambda stack: idp.mint(_claims(stack), key=None, alg="none"),
    "typ_not_allowed": _header(typ="JWT"),
    "crit_unsupported": _header(crit=["exp"]),
    "token_nested": _header(cty="JWT"),
    "kid_missing": lambda stack: idp.mint(
        _claims(stack), key=idp.load_or_create_key(stack.state / "idp")
    ),
    "kid_invalid": _header(kid="k" * 300),
    "payload_malformed": _raw_payload(b"[1, 2]"),
    "id_token": _claim(nonce="n-0S6_WzA2Mj"),
    "org_authorization_server": lambda stack: _signed(
        stack, _claims(stack, iss="https://127.0.0.1", aud="https://127.0.0.1")
    ),
    "iss_mismatch": _claim(iss="https://evil.example/oauth2/default"),
    "kid_unknown": _header(kid="rotated-away"),
    "signature_invalid": _other_key,
    "aud_mismatch": _claim(aud=["api://default", "api://other"]),
    "exp_missing": _claim(exp=_DROP),
    "exp_invalid": _claim(exp="tomorrow"),
    "expired": lambda stack: _signed(stack, _claims(stack, exp=_now() - 120, iat=_now() - 900)),
    "nbf_invalid": _claim(nbf=None),
    "nbf_future": lambda stack: _signed(stack, _claims(stack, nbf=_now() + 600)),
    "iat_missing": _claim(iat=_DROP),
    "iat_invalid": _claim(iat=True),
    "iat_future": lambda stack: _signed(stack, _claims(stack, iat=_now() + 600)),
    "lifetime_too_long": lambda stack: _signed(stack, _claims(stack, exp=_now() + 90_000)),
    "sub_missing": _claim(sub=""),
    "sub_invalid": _claim(sub="deploy-bot\u202e"),
    "groups_invalid": _claim(groups="platform"),
    "cid_invalid": _claim(cid=7),
    "client_id_invalid": _claim(cid=_DROP, client_id=["deploy-bot"]),
    "azp_invalid": _claim(cid=_DROP, azp=False),
    "jti_invalid": _claim(jti=7),
    # Accepted as a token, but 512 four-byte characters of groups, \u-escaped
    # in the assertion, make it larger than the policy service takes.
    "identity_too_large": lambda stack: _signed(
        stack,
        _claims(stack, groups=["platform", "\U0001f600" * 256, "\U0001f601" * 256]),
        ascii_only=False,
    ),
}
ISSUER_SIDE: dict[str, Build] = {
    # Refused by the issuer before any verifier call: nothing to verify.
    "token_too_large": lambda stack: "a" * (MAX_TOKEN_BYTES + 1),
    "token_missing": lambda stack: "",
}
UNIT_ONLY = {
    # The dev IdP's JWKS binds its key to RS256, the only algorithm the stack
    # allows, so no token can reach this rule here; test_tokens.py covers it.
    "alg_key_mismatch",
}


def _request(stack: Stack, token: str) -> grpc.RpcError:
    credentials = grpc.ssl_channel_credentials(root_certificates=stack.pki.ca.read_bytes())
    with grpc.secure_channel(stack.address("issuer"), credentials) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)
        request = issuer_pb2.RequestGrantRequest(connection="orders-replica")
        try:
            stub.RequestGrant(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
        except grpc.RpcError as exc:
            return exc
    raise AssertionError("a hostile token got a grant")


def _answer(error: grpc.RpcError) -> tuple[object, ...]:
    assert isinstance(error, grpc.Call)
    return error.code(), error.details(), tuple(error.trailing_metadata() or ())


def _rejections(stack: Stack) -> dict[str, str]:
    credentials = tls.channel_credentials(stack.pki.files("auditor"))
    options = [("grpc.ssl_target_name_override", "audit")]
    with grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel:
        records = audit_pb2_grpc.AuditStub(channel).Read(audit_pb2.ReadRequest(), timeout=5)
        return {
            r.event.token_rejected.token_fingerprint: r.event.token_rejected.reason
            for r in records
            if r.event.WhichOneof("kind") == "token_rejected"
        }


def test_every_rule_has_a_hostile_token_here_or_in_the_unit_tests() -> None:
    assert set(CASES) | set(ISSUER_SIDE) | UNIT_ONLY == REASONS


def test_every_rejection_is_the_same_answer_and_audited_with_its_reason(stack: Stack) -> None:
    tokens = {reason: build(stack) for reason, build in {**CASES, **ISSUER_SIDE}.items()}
    answers = {reason: _answer(_request(stack, token)) for reason, token in tokens.items()}
    # One answer for every rule: the agent cannot tell which check failed.
    assert len(set(answers.values())) == 1, answers
    code, message, trailers = answers["kid_unknown"]
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed")
    # The rich status carries the code and message and no detail (no ErrorInfo).
    status = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    assert (status.code, status.message, list(status.details)) == (16, message, [])
    # The operator can: each verifier rejection is in the audit log with its code.
    audited = _rejections(stack)
    for reason in CASES:
        assert audited.get(fingerprint(tokens[reason])) == reason, reason
