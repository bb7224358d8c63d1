"""Compact EdDSA JWTs between jitgate services: identity assertions and grants.

Each token type has its own `typ`, issuer, audience and key, so a token of one
kind can never be accepted as another (RFC 8725, section 3.11). PyJWT checks the
signature, algorithm, issuer and audience; times are checked here against an
explicit `now`, so tests never sleep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common.errors import Unauthenticated
from jitgate.common.keys import key_id

ALGORITHM = "EdDSA"
MAX_TOKEN_BYTES = 8 * 1024
_REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti"]


@dataclass(frozen=True, kw_only=True)
class Signer:
    """Signs one kind of token with one key."""

    key: Ed25519PrivateKey
    issuer: str
    typ: str
    kid: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kid", key_id(self.key.public_key()))

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Return a compact JWS over claims plus our `iss`."""
        payload = {**claims, "iss": self.issuer}
        headers = {"kid": self.kid, "typ": self.typ}
        return jwt.encode(payload, self.key, algorithm=ALGORITHM, headers=headers)


@dataclass(frozen=True, kw_only=True)
class Checker:
    """Accepts one kind of token, signed by one of a few known keys.

    `keys` is consulted for each token, so a mapping that follows its files
    (keyfiles.PublicKeyFiles) lets the trusted keys change while running.
    """

    keys: Mapping[str, Ed25519PublicKey]
    issuer: str
    audience: str
    typ: str
    leeway: float = 5.0
    max_lifetime: float | None = None

    @classmethod
    def for_keys(
        cls, keys: list[Ed25519PublicKey], *, issuer: str, audience: str, typ: str, **kw: Any
    ) -> Checker:
        """Return a checker trusting keys, each known by its thumbprint."""
        return cls(
            keys={key_id(k): k for k in keys}, issuer=issuer, audience=audience, typ=typ, **kw
        )

    def check(self, token: str, now: float) -> dict[str, Any]:
        """Return the verified claims, or raise Unauthenticated naming the failed check."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("size", f"{len(token)} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("format", str(exc)) from exc
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("algorithm", repr(header.get("alg")))
        if header.get("typ") != self.typ:
            raise Unauthenticated("type", repr(header.get("typ")))
        key = self.keys.get(header.get("kid", ""))
        if key is None:
            raise Unauthenticated("key", f"unknown kid {header.get('kid')!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "strict_aud": True,
                },
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(type(exc).__name__, str(exc)) from exc
        self._check_times(claims, now)
        return claims

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise Unauthenticated("times", "exp and iat must be numbers")
        if exp <= now - self.leeway:
            raise Unauthenticated("expired", f"exp {exp} <= now {now:.0f} - leeway")
        if iat > now + self.leeway:
            raise Unauthenticated("issued-in-future", f"iat {iat} > now {now:.0f} + leeway")
        if self.max_lifetime is not None and exp - iat > self.max_lifetime:
            raise Unauthenticated("lifetime", f"{exp - iat}s > {self.max_lifetime}s")
