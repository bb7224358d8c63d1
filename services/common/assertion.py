"""The identity assertion: what the verifier vouches for, in a form only it can sign.

The issuer carries it from the verifier to the policy service but cannot forge
or alter it; the policy service accepts no other form of identity.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common.errors import Unauthenticated
from jitgate.common.identity import spiffe_id
from jitgate.common.jws import Checker, Signer
from jitgate.common.keys import key_id

TYP = "jitgate-identity+jwt"
MAX_LIFETIME = 60.0
"""An assertion is good for one request, never for longer than this."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who an agent's access token says it is, after every check passed."""

    subject: str
    client_id: str
    groups: tuple[str, ...]
    token_expires_at: float
    issuer: str
    token_id: str = ""


def issuer_id(trust_domain: str) -> str:
    """The `iss` of assertions: the verifier's SPIFFE ID."""
    return spiffe_id("verifier", trust_domain)


def audience_id(trust_domain: str) -> str:
    """The `aud` of assertions: the policy service's SPIFFE ID."""
    return spiffe_id("policy", trust_domain)


def signer(key: Ed25519PrivateKey, trust_domain: str) -> Signer:
    """Return the verifier's assertion signer for key."""
    return Signer(key=key, issuer=issuer_id(trust_domain), typ=TYP)


def sign(
    signer: Signer, identity: Identity, *, trust_domain: str, now: float, lifetime: float
) -> tuple[str, float]:
    """Return (assertion, its expiry), at most MAX_LIFETIME from now.

    The assertion's own expiry is not capped at the token's: a token the
    verifier accepted within its clock-skew leeway must still reach the policy
    service, which compares the token's expiry (`tex`) with the grant's and
    answers TOKEN_EXPIRING; otherwise the agent would be told "retry later".
    """
    expires = now + min(lifetime, MAX_LIFETIME)
    claims = {
        "aud": audience_id(trust_domain),
        "sub": identity.subject,
        "cid": identity.client_id,
        "groups": list(identity.groups),
        "tex": int(identity.token_expires_at),
        "tis": identity.issuer,
        "tjti": identity.token_id,
        "iat": int(now),
        "exp": int(expires),
        "jti": secrets.token_hex(16),
    }
    return signer.sign(claims), float(int(expires))


def _strings(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def identity_from(claims: Mapping[str, Any]) -> Identity:
    """Return the Identity in verified assertion claims."""
    groups = _strings(claims.get("groups"))
    fields = (claims.get("cid"), claims.get("tis"), claims.get("tjti", ""))
    if groups is None or not all(isinstance(f, str) for f in fields):
        raise Unauthenticated("assertion-claims", "malformed identity claims")
    if not isinstance(claims.get("tex"), int):
        raise Unauthenticated("assertion-claims", "tex must be an integer")
    return Identity(
        subject=claims["sub"],
        client_id=claims["cid"],
        groups=groups,
        token_expires_at=float(claims["tex"]),
        issuer=claims["tis"],
        token_id=claims.get("tjti", ""),
    )


def checker(
    keys: list[Ed25519PublicKey] | Mapping[str, Ed25519PublicKey],
    trust_domain: str,
    *,
    leeway: float = 5.0,
) -> Checker:
    """Return the Checker the policy service uses for assertions from these verifier keys.

    keys is a list, or a mapping by RFC 7638 thumbprint that may change while
    running (keyfiles.PublicKeyFiles), so the verifier's key can rotate.
    """
    return Checker(
        keys=keys if isinstance(keys, Mapping) else {key_id(key): key for key in keys},
        issuer=issuer_id(trust_domain),
        audience=audience_id(trust_domain),
        typ=TYP,
        leeway=leeway,
        max_lifetime=MAX_LIFETIME,
    )
