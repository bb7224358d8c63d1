"""Internal EdDSA tokens: one kind per typ, issuer, audience and key; time is a parameter."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from jitgate.common import assertion
from jitgate.common.errors import Unauthenticated
from jitgate.common.jws import Checker, Signer

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
SIGNER = Signer(key=KEY, issuer="spiffe://jitgate/verifier", typ="t+jwt")
CHECKER = Checker.for_keys(
    [KEY.public_key()], issuer="spiffe://jitgate/verifier", audience="a", typ="t+jwt", leeway=5
)


def _claims(**over: object) -> dict[str, object]:
    return {"aud": "a", "sub": "s", "jti": "j", "iat": int(NOW), "exp": int(NOW) + 30, **over}


def test_round_trip() -> None:
    claims = CHECKER.check(SIGNER.sign(_claims()), NOW)
    assert claims["sub"] == "s"
    assert claims["iss"] == "spiffe://jitgate/verifier"


@pytest.mark.parametrize(
    ("token", "check"),
    [
        (SIGNER.sign(_claims(exp=int(NOW) - 6)), "expired"),
        (SIGNER.sign(_claims(iat=int(NOW) + 6)), "issued-in-future"),
        (SIGNER.sign(_claims(aud="b")), "InvalidAudienceError"),
        (SIGNER.sign(_claims(aud=["a", "b"])), "InvalidAudienceError"),
        (Signer(key=KEY, issuer="x", typ="t+jwt").sign(_claims()), "InvalidIssuerError"),
        (Signer(key=KEY, issuer="spiffe://jitgate/verifier", typ="u").sign(_claims()), "type"),
        (
            Signer(key=Ed25519PrivateKey.generate(), issuer="i", typ="t+jwt").sign(_claims()),
            "key",
        ),
        (jwt.encode(_claims(), "s" * 32, algorithm="HS256", headers={"typ": "t+jwt"}), "algorithm"),
        ("a" * 9000, "size"),
        ("not.a.jwt", "format"),
    ],
)
def test_rejections_name_their_check(token: str, check: str) -> None:
    with pytest.raises(Unauthenticated) as raised:
        CHECKER.check(token, NOW)
    assert raised.value.check == check


def test_a_missing_claim_is_rejected() -> None:
    claims = _claims()
    del claims["jti"]
    with pytest.raises(Unauthenticated) as raised:
        CHECKER.check(SIGNER.sign(claims), NOW)
    assert raised.value.check == "MissingRequiredClaimError"


def test_a_tampered_payload_fails_the_signature() -> None:
    header, _, signature = SIGNER.sign(_claims()).split(".")
    other = SIGNER.sign(_claims(sub="admin")).split(".")[1]
    with pytest.raises(Unauthenticated) as raised:
        CHECKER.check(f"{header}.{other}.{signature}", NOW)
    assert raised.value.check == "InvalidSignatureError"


def test_assertions_last_a_minute_at_most_and_carry_the_tokens_expiry() -> None:
    identity = assertion.Identity(
        subject="s", client_id="c", groups=("g",), token_expires_at=NOW - 10, issuer="i"
    )
    signer = assertion.signer(KEY, "jitgate")
    token, expires = assertion.sign(signer, identity, trust_domain="jitgate", now=NOW, lifetime=30)
    assert expires == NOW + 30
    checker = assertion.checker([KEY.public_key()], "jitgate")
    assert assertion.identity_from(checker.check(token, NOW)) == identity
    _, expires = assertion.sign(signer, identity, trust_domain="jitgate", now=NOW, lifetime=600)
    assert expires == NOW + assertion.MAX_LIFETIME


def test_an_assertion_claiming_a_longer_life_is_refused() -> None:
    signer = assertion.signer(KEY, "jitgate")
    claims = _claims(aud="spiffe://jitgate/policy", exp=int(NOW) + 61, cid="c", groups=[], tex=0)
    with pytest.raises(Unauthenticated) as raised:
        assertion.checker([KEY.public_key()], "jitgate").check(signer.sign(claims), NOW)
    assert raised.value.check == "lifetime"


def test_a_grant_token_is_not_an_identity_assertion() -> None:
    from jitgate.common import grants

    grant = grants.token_signer(KEY, "jitgate").sign(_claims(aud="spiffe://jitgate/policy"))
    with pytest.raises(Unauthenticated):
        assertion.checker([KEY.public_key()], "jitgate").check(grant, NOW)
