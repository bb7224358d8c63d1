"""The checks an agent's OIDC access token must pass, each a named rule, in a fixed order.

PyJWT is used as a primitive for one thing only, the signature, with an
explicit algorithm and a key object; every other rule is ours, because its
defaults accept what a gateway must not (RFC 8725 lists the attacks). Each
failure raises Unauthenticated with a stable check name for the log and the
audit record; the agent learns nothing from it.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from jitgate.common.assertion import Identity
from jitgate.common.errors import Unauthenticated
from jitgate.common.validate import printable

MAX_TOKEN_BYTES = 8 * 1024
"""Okta access tokens are 1-2 KiB; the cap bounds work done before the signature."""
MAX_LEEWAY = 60.0
MAX_NUMERIC_DATE = 253402300799
"""9999-12-31T23:59:59Z: the last instant a protobuf Timestamp can carry."""
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
"""The algorithms a configuration may allow: asymmetric, for the RSA keys a JWKS offers."""
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
CLAIMED_CHARS = 200
"""How much of an unverified claim a rejection record keeps."""


@dataclass(frozen=True, kw_only=True)
class VerificationKey:
    """A public key from the issuer's JWKS, usable for signatures."""

    kid: str
    key: RSAPublicKey = field(repr=False)
    alg: str | None = None


class KeySource(Protocol):
    """Where verification keys come from (the JWKS cache, or a fixed set in tests)."""

    def get(self, kid: str) -> VerificationKey | None:
        """Return the key called kid, if it is known now."""
        ...

    async def ensure(self, kid: str) -> None:
        """Try to make kid known (a rate-limited refresh); raise Unavailable if no keys exist."""
        ...


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """What a token says about itself before any check: recorded, never trusted."""

    subject: str = ""
    issuer: str = ""
    key_id: str = ""


def allowed_algorithms(names: tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """Return names as an allow-list, or raise ValueError for anything not asymmetric.

    `none` and the HMAC family are refused in any spelling: with a public key as
    the HMAC secret, anyone can sign (RFC 8725, section 2.1; CVE-2015-9235,
    CVE-2022-29217).
    """
    if not names:
        raise ValueError("at least one algorithm is required")
    for name in names:
        if name.lower() == "none" or name.upper().startswith("HS"):
            raise ValueError(f"{name!r} is never allowed: only asymmetric algorithms are")
        if name not in ALGORITHMS:
            raise ValueError(f"{name!r} is not supported; use {', '.join(sorted(ALGORITHMS))}")
    return frozenset(names)


def _b64url(segment: str) -> bytes:
    # Strict base64url without padding (RFC 7515, section 2): one encoding per
    # value, so the bytes we check are the bytes that were signed.
    if "=" in segment or "+" in segment or "/" in segment or len(segment) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != segment:
        raise ValueError("not canonical base64url")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A JSON object with a repeated member reads differently in different
    # parsers; reject it rather than guess (RFC 7515, section 5.2).
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _json_object(segment: str) -> dict[str, Any]:
    value = json.loads(_b64url(segment).decode("utf-8"), object_pairs_hook=_no_duplicates)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _segments(token: str) -> list[str]:
    # 1. Size before anything else: no decoding work for an oversized token.
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("token_too_large", f"{len(token)} characters")
    if not token:
        raise Unauthenticated("token_missing")
    if not token.isascii():
        raise Unauthenticated("token_malformed", "non-ASCII characters")
    # 2. A JWS in compact form has exactly three segments; five would be a JWE.
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated("segment_count", f"{len(parts)} segments")
    # Unpadded base64url only (RFC 7515, section 2), so one token has one spelling.
    if not all(_SEGMENT.fullmatch(part) and len(part) % 4 != 1 for part in parts):
        raise Unauthenticated("token_malformed", "segments are not unpadded base64url")
    return parts


def peek(token: str) -> Claimed:
    """Return what an unverified token claims, printable and truncated; never raises."""
    try:
        parts = _segments(token)
    except Unauthenticated:
        return Claimed()
    found: dict[str, str] = {}
    for index, names in ((0, ("kid",)), (1, ("sub", "iss"))):
        try:
            decoded = _json_object(parts[index])
        except (ValueError, RecursionError):
            continue
        for name in names:
            value = decoded.get(name)
            if isinstance(value, str):
                found[name] = printable(value, CLAIMED_CHARS)
    return Claimed(
        subject=found.get("sub", ""), issuer=found.get("iss", ""), key_id=found.get("kid", "")
    )


MAX_SUBJECT_CHARS = 256


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    # RFC 7519, section 2: a NumericDate is a JSON number. bool is an int in
    # Python, and NaN or infinity would make every comparison false.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"{name}_invalid", f"{name} is not a number")
    # Range first: math.isfinite raises OverflowError on an int like 10**400.
    if isinstance(value, float) and not math.isfinite(value):
        raise Unauthenticated(f"{name}_invalid", f"{name} is not a number")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise Unauthenticated(f"{name}_invalid", f"{name} {value} is out of range")
    return float(value)


def _optional_string(claims: Mapping[str, Any], *names: str) -> str:
    for name in names:
        if name in claims:
            value = claims[name]
            if not isinstance(value, str):
                raise Unauthenticated(f"{name}_invalid", f"{name} is not a string")
            return value
    return ""


@dataclass(frozen=True, kw_only=True)
class AccessTokenVerifier:
    """Verifies access tokens from one issuer for one audience."""

    issuer: str
    audience: str
    keys: KeySource
    groups_claim: str = "groups"
    algorithms: frozenset[str] = frozenset({"RS256"})
    leeway: float = 30.0
    _jws: jwt.PyJWS = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithms", allowed_algorithms(self.algorithms))
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0 to {MAX_LEEWAY} seconds")
        if not self.issuer or not self.audience or not self.groups_claim:
            raise ValueError("issuer, audience and groups_claim are required")
        # A PyJWS that knows only our algorithms: even a bug elsewhere cannot
        # make it verify with HMAC or none.
        object.__setattr__(self, "_jws", jwt.PyJWS(algorithms=sorted(self.algorithms)))

    def key_id(self, token: str) -> str:
        """Return the kid of a token that passes the checks that need no key."""
        return self._header(_segments(token))[1]

    async def authenticate(self, token: str, now: float) -> Identity:
        """Return the token's identity, refreshing keys once if its kid is new."""
        kid = self.key_id(token)
        if self.keys.get(kid) is None:
            await self.keys.ensure(kid)
        return self.verify(token, now)

    def verify(self, token: str, now: float) -> Identity:
        """Return the identity in token if it passes every check at time now."""
        parts = _segments(token)
        alg, kid = self._header(parts)
        key = self._key(kid, alg)
        claims = self._signed_claims(token, key.key, alg)
        self._check_issuer_and_audience(claims)
        expires = self._check_times(claims, now)
        return self._identity(claims, expires)

    def _header(self, parts: list[str]) -> tuple[str, str]:
        try:
            header = _json_object(parts[0])
        except (ValueError, RecursionError) as exc:
            raise Unauthenticated("header_malformed", str(exc)[:100]) from exc
        # 3. Algorithm allow-list, compared exactly: "none", "NONE" and every
        # HS* are absent from it by construction (RFC 8725, section 3.1;
        # CVE-2015-9235 alg none, CVE-2016-10555 and CVE-2022-29217 key confusion).
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthenticated("alg_not_allowed", repr(alg)[:40])
        # 4. The key comes from our issuer's JWKS by kid, never from the token
        # itself (jku, x5u, jwk, x5c are ignored: RFC 8725, section 3.10).
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("kid_missing")
        return alg, kid

    def _key(self, kid: str, alg: str) -> VerificationKey:
        key = self.keys.get(kid)
        if key is None:
            raise Unauthenticated("kid_unknown", repr(kid)[:80])
        # A key is for one algorithm when its JWK says so (RFC 8725, section 3.1).
        if key.alg is not None and key.alg != alg:
            raise Unauthenticated("alg_key_mismatch", f"key is {key.alg}, token says {alg}")
        return key

    def _signed_claims(self, token: str, key: RSAPublicKey, alg: str) -> dict[str, Any]:
        # 5. The signature, by PyJWT with one explicit algorithm and a key
        # object (not PEM bytes, which an HMAC could be tricked into using).
        try:
            decoded = self._jws.decode_complete(
                token,
                key,
                algorithms=[alg],
                options={"verify_signature": True, "enforce_minimum_key_length": True},
            )
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("signature_invalid") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("jws_rejected", type(exc).__name__) from exc
        try:
            claims = json.loads(
                decoded["payload"].decode("utf-8"), object_pairs_hook=_no_duplicates
            )
        except (ValueError, RecursionError) as exc:
            raise Unauthenticated("payload_malformed", str(exc)[:100]) from exc
        if not isinstance(claims, dict):
            raise Unauthenticated("payload_malformed", "not a JSON object")
        return claims

    def _check_issuer_and_audience(self, claims: Mapping[str, Any]) -> None:
        # 6. iss is compared exactly: no prefix, substring or case folding
        # (RFC 7519, section 4.1.1; CVE-2024-53861 was a substring match).
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss != self.issuer:
            raise Unauthenticated("iss_mismatch", repr(iss)[:120])
        # 7. A token for another API must not work here (RFC 7519, section
        # 4.1.3; RFC 8725, section 3.9).
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or self.audience not in [
            a for a in audiences if isinstance(a, str)
        ]:
            raise Unauthenticated("aud_mismatch", repr(aud)[:120])

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        # 8. Times, against the now we were given, with a small leeway for
        # clock skew (RFC 7519, sections 4.1.4 to 4.1.6).
        expires = _numeric_date(claims, "exp")
        if expires is None:
            raise Unauthenticated("exp_missing")
        if now >= expires + self.leeway:
            raise Unauthenticated("expired", f"exp {expires:.0f}, now {now:.0f}")
        not_before = _numeric_date(claims, "nbf")
        if not_before is not None and not_before > now + self.leeway:
            raise Unauthenticated("nbf_future", f"nbf {not_before:.0f}, now {now:.0f}")
        issued = _numeric_date(claims, "iat")
        if issued is not None and issued > now + self.leeway:
            raise Unauthenticated("iat_future", f"iat {issued:.0f}, now {now:.0f}")
        return expires

    def _identity(self, claims: Mapping[str, Any], expires: float) -> Identity:
        # 9. Who: a non-empty subject, groups as a list of strings (a bare
        # string is rejected rather than read as one group or as characters).
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("sub_missing")
        # The subject names the agent in logs, Redis and the audit log: no
        # control or bidi-override characters, and a bounded length.
        if len(subject) > MAX_SUBJECT_CHARS or not subject.isprintable():
            raise Unauthenticated("sub_invalid", "sub is too long or not printable")
        groups = claims.get(self.groups_claim, [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise Unauthenticated("groups_invalid", f"{self.groups_claim} is not a list of strings")
        return Identity(
            subject=subject,
            # Okta names the client in `cid`; other issuers use client_id (RFC
            # 9068, section 2.2) or azp.
            client_id=_optional_string(claims, "cid", "client_id", "azp"),
            groups=tuple(sorted(set(groups))),
            token_expires_at=expires,
            issuer=self.issuer,
            token_id=_optional_string(claims, "jti"),
        )
