"""Every rule of the access-token checks: the happy path and one negative test per rejection."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.common.errors import Unauthenticated, Unavailable
from jitgate.devstack import idp
from jitgate.verifier.tokens import (
    MAX_TOKEN_BYTES,
    REASONS,
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
    return AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE)


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
    verifier = AccessTokenVerifier(issuers={ISSUER: keys}, audience=AUDIENCE)
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
        issuers={ISSUER: StaticKeys(empty_is_unavailable=True)}, audience=AUDIENCE
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
        issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE, groups_claim="roles"
    )
    token = issuer.mint(_claims(issuer, roles=["ops"]))
    assert verifier.verify(token, NOW).groups == ("ops",)


def test_an_audience_list_of_only_ours_is_accepted(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    token = issuer.mint(_claims(issuer, aud=[AUDIENCE]))
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


@pytest.mark.parametrize("count", [1, 2, 4, 6])
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
        issuers={ISSUER: StaticKeys(_key(issuer))},
        audience=AUDIENCE,
        algorithms=frozenset({"RS256", "PS256"}),
    )
    token = issuer.mint(_claims(issuer), alg="PS256")
    assert verifier.verify(token, NOW).subject == "deploy-bot"


def test_a_key_bound_to_another_algorithm_is_not_used(issuer: idp.Idp) -> None:
    verifier = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(_key(issuer, alg="PS256"))},
        audience=AUDIENCE,
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


@pytest.mark.parametrize("kid", [_DROP, ""])
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


@pytest.mark.parametrize("value", ["1800000000", True, None, 1e30, 10**400, -1, [NOW]])
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
        issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE, leeway=0
    )
    _rejects(strict, issuer.mint(_claims(issuer, iat=NOW + 1)), "iat_future")


@pytest.mark.parametrize("leeway", [-1.0, 61.0])
def test_a_leeway_outside_zero_to_sixty_seconds_is_refused(issuer: idp.Idp, leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        AccessTokenVerifier(
            issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE, leeway=leeway
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


@pytest.mark.parametrize("value", [7, None, ["x"], "x" * 257, "bot\n", "\ud800"])
@pytest.mark.parametrize("claim", ["cid", "client_id", "azp", "jti"])
def test_a_client_or_token_id_that_is_not_a_printable_string_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, claim: str, value: object
) -> None:
    # The client id is read from cid, else client_id, else azp. A lone
    # surrogate has no UTF-8 form: accepted here, it would fail far later.
    claims = _claims(issuer, cid=_DROP) if claim != "jti" else _claims(issuer)
    _rejects(verifier, issuer.mint({**claims, claim: value}), f"{claim}_invalid")


@pytest.mark.parametrize("groups", [["ok", "bad\nline"], ["\ud800"], ["x" * 257], ["g"] * 257])
def test_groups_that_would_corrupt_logs_are_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, groups: list[str]
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, groups=groups)), "groups_invalid")


def test_an_audience_that_is_an_issuer_is_refused(issuer: idp.Idp) -> None:
    with pytest.raises(ValueError, match="not an issuer"):
        AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=ISSUER)


# Explicit typing, extensions and nesting (header rules).


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+JWT"])
def test_an_access_token_type_is_accepted(
    verifier: AccessTokenVerifier, issuer: idp.Idp, typ: str
) -> None:
    token = issuer.mint(_claims(issuer), headers={"typ": typ})
    assert verifier.verify(token, NOW).subject == "deploy-bot"


@pytest.mark.parametrize("typ", ["JWT", "id_token+jwt", "logout+jwt", "", None, 1, ["at+jwt"]])
def test_any_other_type_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, typ: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer), headers={"typ": typ}), "typ_not_allowed")


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "b64"])
def test_a_critical_extension_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, crit: object
) -> None:
    token = issuer.mint(_claims(issuer), headers={"crit": crit, "b64": True})
    _rejects(verifier, token, "crit_unsupported")


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/json"])
def test_a_nested_token_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, cty: str
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer), headers={"cty": cty}), "token_nested")


def test_an_encrypted_token_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    header = _segment({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": issuer.kid})
    _rejects(verifier, f"{header}.AAAA.AAAA.AAAA.AAAA", "token_encrypted")


@pytest.mark.parametrize("kid", ["k" * 257, "kid\nline", "kid\u202e", 7, ["k1"], None])
def test_a_kid_that_is_not_a_printable_string_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, kid: str
) -> None:
    headers = {"kid": kid} if kid is not None else {"kid": None}
    token = idp.mint(_claims(issuer), key=issuer.key, headers=headers)
    _rejects(verifier, token, "kid_missing" if kid is None else "kid_invalid")


@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_a_key_url_in_the_header_is_never_fetched(
    verifier: AccessTokenVerifier, issuer: idp.Idp, other_key: rsa.RSAPrivateKey, member: str
) -> None:
    # The URL is never contacted: the kid is looked up in our JWKS only.
    headers = {member: "https://attacker.example/keys"}
    token = idp.mint(_claims(issuer), key=other_key, kid="attacker", headers=headers)
    _rejects(verifier, token, "kid_unknown")


def test_a_certificate_chain_in_the_header_is_never_used(
    verifier: AccessTokenVerifier, issuer: idp.Idp, other_key: rsa.RSAPrivateKey
) -> None:
    der = other_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    headers = {"x5c": [base64.b64encode(der).decode()]}
    token = idp.mint(_claims(issuer), key=other_key, kid=issuer.kid, headers=headers)
    _rejects(verifier, token, "signature_invalid")


# Tokens of the wrong kind.


@pytest.mark.parametrize("claim", ["nonce", "at_hash", "c_hash"])
def test_an_id_token_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, claim: str
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, **{claim: "abc"})), "id_token")


def test_a_token_whose_audience_is_its_client_is_an_id_token(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    claims = _claims(issuer)
    _rejects(verifier, issuer.mint({**claims, "aud": claims["cid"]}), "id_token")


def test_an_org_authorization_server_token_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    # Okta's org authorization server: iss and aud are both the org URL.
    org = "https://idp.example"
    _rejects(verifier, issuer.mint(_claims(issuer, iss=org, aud=org)), "org_authorization_server")


# Several issuers, each with its own keys.


def test_each_trusted_issuer_is_verified_with_its_own_keys(
    issuer: idp.Idp, other_key: rsa.RSAPrivateKey
) -> None:
    second = idp.Idp(
        issuer="https://idp.example/oauth2/agents", key=other_key, agents=issuer.agents
    )
    verifier = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(_key(issuer)), second.issuer: StaticKeys(_key(second))},
        audience=AUDIENCE,
    )
    assert verifier.verify(issuer.mint(_claims(issuer)), NOW).issuer == ISSUER
    token = second.mint(_claims(issuer, iss=second.issuer))
    assert verifier.verify(token, NOW).issuer == second.issuer
    # A key of the first issuer never vouches for a token claiming the second.
    hijack = issuer.mint(_claims(issuer, iss=second.issuer))
    _rejects(verifier, hijack, "kid_unknown")


def test_a_foreign_issuer_never_triggers_a_key_refresh(issuer: idp.Idp) -> None:
    keys = StaticKeys(_key(issuer))
    verifier = AccessTokenVerifier(issuers={ISSUER: keys}, audience=AUDIENCE)
    token = issuer.mint(_claims(issuer, iss="https://evil.example"), kid="new-kid")
    with pytest.raises(Unauthenticated) as caught:
        asyncio.run(verifier.authenticate(token, NOW))
    assert caught.value.check == "iss_mismatch"
    assert keys.ensured == []


# Audience, lifetime.


@pytest.mark.parametrize("aud", [[AUDIENCE, "api://other"], [], [AUDIENCE, 7], _DROP, 7])
def test_an_audience_other_than_exactly_ours_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, aud: object
) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, aud=aud)), "aud_mismatch")


def test_a_missing_iat_is_rejected(verifier: AccessTokenVerifier, issuer: idp.Idp) -> None:
    _rejects(verifier, issuer.mint(_claims(issuer, iat=_DROP)), "iat_missing")


def test_a_token_that_lives_too_long_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    day = 24 * 3600
    assert verifier.verify(issuer.mint(_claims(issuer, exp=NOW + day)), NOW)
    _rejects(verifier, issuer.mint(_claims(issuer, exp=NOW + day + 1)), "lifetime_too_long")
    short = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE, max_lifetime=3600
    )
    _rejects(short, issuer.mint(_claims(issuer, exp=NOW + 3601)), "lifetime_too_long")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_number_json_does_not_have_is_rejected(
    verifier: AccessTokenVerifier, issuer: idp.Idp, literal: str
) -> None:
    payload = json.dumps(_claims(issuer)).replace(f'"exp": {int(NOW) + 3600}', f'"exp": {literal}')
    assert literal in payload
    header = _segment({"alg": "RS256", "kid": issuer.kid})
    token = _sign_raw(issuer, f"{header}.{_segment(payload.encode())}")
    _rejects(verifier, token, "payload_malformed")


def test_empty_groups_mean_no_groups_and_matching_is_exact(
    verifier: AccessTokenVerifier, issuer: idp.Idp
) -> None:
    assert verifier.verify(issuer.mint(_claims(issuer, groups=[])), NOW).groups == ()
    token = issuer.mint(_claims(issuer, groups=["Platform", "platform "]))
    assert verifier.verify(token, NOW).groups == ("Platform", "platform ")


# Other asymmetric algorithms, each bound to its key type and curve.


def _ec_token(
    issuer: idp.Idp, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, alg: str
) -> str:
    return jwt.encode(_claims(issuer), key, algorithm=alg, headers={"kid": "k2", "typ": None})


@pytest.mark.parametrize(
    ("alg", "curve"),
    [("ES256", ec.SECP256R1()), ("ES384", ec.SECP384R1()), ("ES512", ec.SECP521R1())],
)
def test_ecdsa_tokens_verify_when_allowed(
    issuer: idp.Idp, alg: str, curve: ec.EllipticCurve
) -> None:
    key = ec.generate_private_key(curve)
    verifier = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(VerificationKey(kid="k2", key=key.public_key()))},
        audience=AUDIENCE,
        algorithms=frozenset({alg}),
    )
    assert verifier.verify(_ec_token(issuer, key, alg), NOW).subject == "deploy-bot"


def test_eddsa_tokens_verify_when_allowed(issuer: idp.Idp) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(VerificationKey(kid="k2", key=key.public_key()))},
        audience=AUDIENCE,
        algorithms=frozenset({"EdDSA"}),
    )
    assert verifier.verify(_ec_token(issuer, key, "EdDSA"), NOW).subject == "deploy-bot"


def test_a_key_of_another_type_or_curve_is_not_used(issuer: idp.Idp) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    verifier = AccessTokenVerifier(
        issuers={ISSUER: StaticKeys(VerificationKey(kid="k2", key=p384.public_key()))},
        audience=AUDIENCE,
        algorithms=frozenset({"ES256", "RS256"}),
    )
    # ES256 is P-256 only (RFC 7518, section 3.4); RS256 needs an RSA key.
    p256 = ec.generate_private_key(ec.SECP256R1())
    _rejects(verifier, _ec_token(issuer, p256, "ES256"), "alg_key_mismatch")
    _rejects(verifier, issuer.mint(_claims(issuer), kid="k2"), "alg_key_mismatch")


def test_every_reason_code_is_named_once() -> None:
    assert all(code.isidentifier() and code.islower() for code in REASONS)


# Robustness.


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_one_character_change_is_rejected_never_crashes(
    issuer: idp.Idp, data: st.DataObject
) -> None:
    verifier = AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE)
    token = issuer.mint(_claims(issuer))
    index = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from("ABCabc0189-_.=+/ "))
    mutated = token[:index] + char + token[index + 1 :]
    if mutated != token:
        with pytest.raises(Unauthenticated):
            verifier.verify(mutated, NOW)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_CLAIMS = ["iss", "aud", "exp", "iat", "nbf", "sub", "groups", "cid", "client_id", "azp", "jti"]
_HEADERS = ["alg", "typ", "kid", "crit", "cty", "jku", "x5u", "jwk", "b64"]


def _accepted_identity_is_sane(verifier: AccessTokenVerifier, token: str) -> None:
    try:
        identity = verifier.verify(token, NOW)
    except Unauthenticated as exc:
        rejected = exc.check
    else:
        rejected = ""
    if rejected:
        assert rejected in REASONS
        return
    assert identity.issuer == ISSUER
    assert identity.subject.isprintable()
    assert all(isinstance(g, str) for g in identity.groups)
    assert identity.token_expires_at > NOW - verifier.leeway


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(_CLAIMS), _JSON | st.just(_DROP), max_size=4))
def test_any_claims_are_accepted_sanely_or_rejected_by_a_rule(
    issuer: idp.Idp, changes: dict[str, Any]
) -> None:
    verifier = AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE)
    _accepted_identity_is_sane(verifier, issuer.mint(_claims(issuer, **changes)))


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(st.sampled_from(_HEADERS) | st.text(max_size=6), _JSON, max_size=4))
def test_any_header_is_accepted_sanely_or_rejected_by_a_rule(
    issuer: idp.Idp, headers: dict[str, Any]
) -> None:
    verifier = AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE)
    _accepted_identity_is_sane(verifier, issuer.mint(_claims(issuer), headers=headers))


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_any_segments_are_rejected_by_a_rule(issuer: idp.Idp, segments: list[bytes]) -> None:
    verifier = AccessTokenVerifier(issuers={ISSUER: StaticKeys(_key(issuer))}, audience=AUDIENCE)
    token = ".".join(_segment(segment) for segment in segments)
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token, NOW)
    assert caught.value.check in REASONS


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
