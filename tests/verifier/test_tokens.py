"""Every rule of the access-token checks: the happy path and one negative test per rejection."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.common.errors import Unauthenticated, Unavailable
from jitgate.devstack import idp
from jitgate.verifier.tokens import (
    MAX_TOKEN_BYTES,
    AccessTokenVerifier,
    VerificationKey,
    allowed_algorithms,
    peek,
)

from .conftest import NOW

ISSUER = "https://idp.example/oauth2/default"
AUDIENCE = "api://default"


class StaticKeys:
    """A fixed key set; ensure() counts how often a refresh was asked for."""

    def __init__(self, *keys: VerificationKey, empty_is_unavailable: bool = False) -> None:
        self.keys = {k.kid: k for k in keys}
        self.ensured: list[str] = []
        self.empty_is_unavailable = empty_is_unavailable

    def get(self, kid: str) -> VerificationKey | None:
        return self.keys.get(kid)

    async def ensure(self, kid: str) -> None:
        self.ensured.append(kid)
        if self.empty_is_unavailable and not self.keys:
            raise Unavailable("jwks", "no keys")


@pytest.fixture(scope="module")
def issuer(idp_state: Path) -> idp.Idp:
    return idp.Idp(issuer=ISSUER, key=idp.load_or_create_key(idp_state), agents=idp.load_agents())


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key(issuer: idp.Idp, alg: str | None = None) -> VerificationKey:
    return VerificationKey(kid=issuer.kid, key=issuer.key.public_key(), alg=alg)


@pytest.fixture
def verifier(issuer: idp.Idp) -> AccessTokenVerifier:
    return AccessTokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(_key(issuer)))


def _claims(issuer: idp.Idp, **changes: Any) -> dict[str, Any]:
    claims = issuer.claims(issuer.agents["deploy-bot"], now=NOW, scopes=("jitgate",))
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


_DROP = object()


def _rejects(verifier: AccessTokenVerifier, token: str, check: str, now: float = NOW) -> None:
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token, now)
    assert caught.value.check == check, caught.value


def _segment(data: dict[str, Any] | list[Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# The happy path.


def test_a_good_token_yields_its_identity(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    claims = _claims(issuer, groups=["platform", "db-readers", "platform"])
    identity = verifier.verify(issuer.mint(claims), NOW)
    assert identity.subject == "deploy-bot"
    assert identity.client_id == "deploy-bot"
    assert identity.groups == ("db-readers", "platform")  # sorted, each once
    assert identity.token_expires_at == NOW + idp.DEFAULT_TOKEN_LIFETIME
    assert identity.issuer == ISSUER
    assert identity.token_id == claims["jti"]


def test_an_issued_access_token_verifies(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    identity = verifier.verify(issuer.access_token("intern-bot", now=NOW), NOW + 10)
    assert identity.groups == ("interns",)


async def test_authenticate_asks_for_an_unknown_kid_once_then_verifies(issuer: idp.Idp) -> None:
    keys = StaticKeys()
    verifier = AccessTokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=keys)
    token = issuer.mint(_claims(issuer))
    with pytest.raises(Unauthenticated) as caught:
        await verifier.authenticate(token, NOW)
    assert caught.value.check == "kid_unknown"
    assert keys.ensured == [issuer.kid]
    keys.keys[issuer.kid] = _key(issuer)
    assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"
    assert keys.ensured == [issuer.kid]  # a known kid needs no refresh


async def test_no_keys_at_all_is_unavailable_not_a_rejection(issuer: idp.Idp) -> None:
    verifier = AccessTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(empty_is_unavailable=True)
    )
    with pytest.raises(Unavailable):
        await verifier.authenticate(issuer.mint(_claims(issuer)), NOW)


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({"client_id": "svc-1"}, "svc-1"),
        ({"azp": "svc-2"}, "svc-2"),
        ({"client_id": "svc-1", "azp": "svc-2"}, "svc-1"),
        ({}, ""),
    ],
)
def test_the_client_id_falls_back_from_cid_to_client_id_to_azp(
    verifier: AccessTokenVerifier, issuer: idp.Idp, present: dict[str, str], expected: str
) -> None:
    claims = {**_claims(issuer, cid=_DROP), **present}
    assert verifier.verify(issuer.mint(claims), NOW).client_id == expected


def test_absent_groups_mean_no_groups(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    assert verifier.verify(issuer.mint(_claims(issuer, groups=_DROP)), NOW).groups == ()


def test_the_groups_claim_name_is_configurable(issuer: idp.Idp) -> None:
    verifier = AccessTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(_key(issuer)), groups_claim="roles"
    )
    token = issuer.mint(_claims(issuer, roles=["ops"]))
    assert verifier.verify(token, NOW).groups == ("ops",)


def test_an_audience_list_containing_ours_is_accepted(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    token = issuer.mint(_claims(issuer, aud=["api://other", AUDIENCE]))
    assert verifier.verify(token, NOW).subject == "deploy-bot"


def test_times_within_the_leeway_are_accepted(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    claims = _claims(issuer, iat=NOW + 29, nbf=NOW + 29, exp=NOW + 100)
    assert verifier.verify(issuer.mint(claims), NOW).subject == "deploy-bot"
    expiring = _claims(issuer, exp=NOW)
    assert verifier.verify(issuer.mint(expiring), NOW + 29).subject == "deploy-bot"


# 1. Size and shape.


def test_an_oversized_token_is_rejected_before_decoding(verifier: AccessTokenVerifier) -> None:
    _rejects(verifier, "a" * (MAX_TOKEN_BYTES + 1), "token_too_large")


def test_an_empty_token_is_rejected(verifier: AccessTokenVerifier) -> None:
    _rejects(verifier, "", "token_missing")


def test_non_ascii_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer)) + "é", "token_malformed")


@pytest.mark.parametrize("count", [1, 2, 4, 5])
def test_anything_but_three_segments_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, count: int
) -> None:
    parts = issuer.mint(_claims(issuer)).split(".")
    _rejects(verifier, ".".join((parts * 2)[:count]), "segment_count")


def test_padded_base64_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    token = issuer.mint(_claims(issuer))
    _rejects(verifier, token + "=" * (-len(token.rsplit(".", 1)[1]) % 4 or 4), "token_malformed")


def test_standard_base64_characters_are_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    header, payload, signature = issuer.mint(_claims(issuer)).split(".")
    _rejects(verifier, f"{header}.{payload}.{signature[:-1]}+", "token_malformed")


@pytest.mark.parametrize(
    "header", [b"not json", b"[1, 2]", b'{"alg": "RS256", "alg": "none"}', b"\xff\xfe"]
)
def test_a_header_that_is_not_one_json_object_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, header: bytes
) -> None:
    _, payload, signature = issuer.mint(_claims(issuer)).split(".")
    _rejects(verifier, f"{_segment(header)}.{payload}.{signature}", "header_malformed")


# 3. The algorithm allow-list.


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_rejected_in_any_spelling(
    verifier: AccessTokenVerifier, issuer: idp.Idp, alg: str
) -> None:
    token = idp.mint(_claims(issuer), key=None, alg=alg, kid=issuer.kid)
    assert token.endswith(".")
    _rejects(verifier, token, "alg_not_allowed")


@pytest.mark.parametrize("alg", ["HS256", "hs256", "HS384", "HS512"])
def test_hmac_signed_with_the_rsa_public_key_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, alg: str
) -> None:
    # The classic key confusion (CVE-2015-9235, CVE-2022-29217): the attacker
    # uses the issuer's published public key, as PEM, as an HMAC secret.
    public_pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = idp.mint(_claims(issuer), key=public_pem, alg=alg.upper(), kid=issuer.kid)
    if alg != alg.upper():
        _, payload, signature = token.split(".")
        token = f"{_segment({'alg': alg, 'kid': issuer.kid})}.{payload}.{signature}"
    _rejects(verifier, token, "alg_not_allowed")


def test_an_asymmetric_algorithm_outside_the_allow_list_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer), alg="PS256"), "alg_not_allowed")


@pytest.mark.parametrize("alg", [_DROP, 256, None, ["RS256"]])
def test_a_missing_or_non_string_alg_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, alg: object
) -> None:
    header = {"kid": issuer.kid} if alg is _DROP else {"alg": alg, "kid": issuer.kid}
    _, payload, signature = issuer.mint(_claims(issuer)).split(".")
    _rejects(verifier, f"{_segment(header)}.{payload}.{signature}", "alg_not_allowed")


def test_other_asymmetric_algorithms_can_be_allowed(issuer: idp.Idp) -> None:
    verifier = AccessTokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        keys=StaticKeys(_key(issuer)),
        algorithms=frozenset({"RS256", "PS256"}),
    )
    token = issuer.mint(_claims(issuer), alg="PS256")
    assert verifier.verify(token, NOW).subject == "deploy-bot"


def test_a_key_bound_to_another_algorithm_is_not_used(issuer: idp.Idp) -> None:
    verifier = AccessTokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        keys=StaticKeys(_key(issuer, alg="PS256")),
        algorithms=frozenset({"RS256", "PS256"}),
    )
    _rejects(verifier, issuer.mint(_claims(issuer)), "alg_key_mismatch")


@pytest.mark.parametrize(
    "names", [("none",), ("HS256",), ("hs512",), ("RS256", "HS256"), ("ES999",), ()]
)
def test_the_allow_list_refuses_symmetric_none_and_unknown_algorithms(
    names: tuple[str, ...],
) -> None:
    with pytest.raises(ValueError, match=r"never allowed|not supported|at least one"):
        allowed_algorithms(names)


# 4. The key.


@pytest.mark.parametrize("kid", [_DROP, "", 7])
def test_a_missing_kid_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, kid: object
) -> None:
    headers = {} if kid is _DROP else {"kid": kid}
    token = idp.mint(_claims(issuer), key=issuer.key, headers=headers)
    _rejects(verifier, token, "kid_missing")


def test_an_unknown_kid_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer), kid="rotated-away"), "kid_unknown")


def test_a_jwk_in_the_header_is_never_used(
    verifier: AccessTokenVerifier, issuer: idp.Idp, other_key: rsa.RSAPrivateKey
) -> None:
    # RFC 8725, section 3.10: a token must not bring its own key.
    jwk = {**idp.rsa_jwk(other_key.public_key()), "kid": "mine"}
    token = idp.mint(_claims(issuer), key=other_key, kid="mine", headers={"jwk": jwk})
    _rejects(verifier, token, "kid_unknown")


# 5. The signature.


def test_a_signature_by_another_key_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, other_key: rsa.RSAPrivateKey
) -> None:
    token = idp.mint(_claims(issuer), key=other_key, kid=issuer.kid)
    _rejects(verifier, token, "signature_invalid")


def test_a_changed_payload_breaks_the_signature(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    header, _, signature = issuer.mint(_claims(issuer)).split(".")
    forged = _segment(_claims(issuer, groups=["admins"]))
    _rejects(verifier, f"{header}.{forged}.{signature}", "signature_invalid")


def test_an_empty_signature_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    header, payload, _ = issuer.mint(_claims(issuer)).split(".")
    _rejects(verifier, f"{header}.{payload}.", "signature_invalid")


@pytest.mark.parametrize("payload", [b"[1]", b'{"sub": "a", "sub": "b"}', b"not json"])
def test_a_signed_payload_that_is_not_one_json_object_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, payload: bytes
) -> None:
    signing_input = f"{_segment({'alg': 'RS256', 'kid': issuer.kid})}.{_segment(payload)}"
    token = _sign_raw(issuer, signing_input)
    _rejects(verifier, token, "payload_malformed")


def _sign_raw(issuer: idp.Idp, signing_input: str) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = issuer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


# 6. The issuer.


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example/oauth2/default",
        ISSUER + "/",
        ISSUER.upper(),
        "https://idp.example/oauth2",  # a prefix (CVE-2024-53861 was a substring match)
        ISSUER + "x",
        [ISSUER],
        _DROP,
    ],
)
def test_any_issuer_but_ours_exactly_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, iss: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, iss=iss)), "iss_mismatch")


# 7. The audience.


@pytest.mark.parametrize(
    "aud", ["api://other", "api://default/", ["api://other"], [], _DROP, 1, [1, 2]]
)
def test_a_token_for_another_audience_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, aud: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, aud=aud)), "aud_mismatch")


# 8. Times.


def test_an_expired_token_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    token = issuer.mint(_claims(issuer, exp=NOW - 60))
    _rejects(verifier, token, "expired")
    # The leeway ends exactly at exp + 30 s.
    _rejects(verifier, issuer.mint(_claims(issuer, exp=NOW)), "expired", now=NOW + 30)


def test_a_missing_exp_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, exp=_DROP)), "exp_missing")


@pytest.mark.parametrize(
    "value", ["1800000000", True, None, float("nan"), float("inf"), 1e30, 10**400, -1, [NOW]]
)
def test_a_time_that_is_not_a_sane_number_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, value: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, exp=value)), "exp_invalid")
    _rejects(verifier, issuer.mint(_claims(issuer, nbf=value)), "nbf_invalid")
    _rejects(verifier, issuer.mint(_claims(issuer, iat=value)), "iat_invalid")


def test_a_token_not_yet_valid_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, nbf=NOW + 31)), "nbf_future")


def test_a_token_issued_in_the_future_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, iat=NOW + 31)), "iat_future")


def test_the_leeway_is_configurable(issuer: idp.Idp) -> None:
    strict = AccessTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(_key(issuer)), leeway=0
    )
    _rejects(strict, issuer.mint(_claims(issuer, iat=NOW + 1)), "iat_future")


@pytest.mark.parametrize("leeway", [-1.0, 61.0])
def test_a_leeway_outside_zero_to_sixty_seconds_is_refused(issuer: idp.Idp, leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        AccessTokenVerifier(
            issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(_key(issuer)), leeway=leeway
        )


# 9. Who.


@pytest.mark.parametrize("sub", [_DROP, "", None, 42, ["deploy-bot"]])
def test_a_missing_or_empty_subject_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, sub: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, sub=sub)), "sub_missing")


@pytest.mark.parametrize("sub", ["bot\u202eevil", "bot\x00", "bot\nline", "x" * 257])
def test_a_subject_that_would_corrupt_logs_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, sub: str
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, sub=sub)), "sub_invalid")


@pytest.mark.parametrize("groups", ["platform", ["platform", 1], {"platform": True}, None])
def test_groups_that_are_not_a_list_of_strings_are_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, groups: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, groups=groups)), "groups_invalid")


@pytest.mark.parametrize("claim", ["cid", "jti"])
def test_a_non_string_client_or_token_id_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, claim: str
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, **{claim: 7})), f"{claim}_invalid")


# Robustness.


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_one_character_change_is_rejected_never_crashes(
    issuer: idp.Idp, data: st.DataObject
) -> None:
    verifier = AccessTokenVerifier(issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(_key(issuer)))
    token = issuer.mint(_claims(issuer))
    index = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from("ABCabc0189-_.=+/ "))
    mutated = token[:index] + char + token[index + 1 :]
    if mutated != token:
        with pytest.raises(Unauthenticated):
            verifier.verify(mutated, NOW)


def test_peek_reads_unverified_claims_for_the_record(issuer: idp.Idp) -> None:
    token = issuer.mint(_claims(issuer, sub="evil\x00bot" + "x" * 500), kid="k\n1")
    claimed = peek(token)
    assert claimed.subject.startswith("evil?bot")
    assert len(claimed.subject) == 200
    assert claimed.issuer == ISSUER
    assert claimed.key_id == "k?1"


@pytest.mark.parametrize(
    "token", ["", "garbage", "a.b.c", "x" * (MAX_TOKEN_BYTES + 1), "e30.e30.", "W10.W10."]
)
def test_peek_never_raises(token: str) -> None:
    claimed = peek(token)
    assert claimed.subject == claimed.issuer == claimed.key_id == ""
