"""The checks an agent's OIDC access token must pass, each a named rule, in a fixed order.

PyJWT is used as a primitive for one thing only, the signature, with an
explicit algorithm and a key object; every other rule is ours, because its
defaults accept what a gateway must not (RFC 8725 lists the attacks). Each
failure raises Unauthenticated with a stable reason code for the log and the
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

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import Algorithm, get_default_algorithms

from jitgate.common.assertion import Identity
from jitgate.common.errors import Unauthenticated
from jitgate.common.validate import printable

MAX_TOKEN_BYTES = 8 * 1024
"""Okta access tokens are 1-2 KiB; the cap bounds work done before the signature."""
MAX_LEEWAY = 60.0
MAX_NUMERIC_DATE = 253402300799
"""9999-12-31T23:59:59Z: the last instant a protobuf Timestamp can carry."""
DEFAULT_MAX_LIFETIME = 24 * 3600.0
"""No access token should live longer than a day; Okta's ceiling is 24 h."""
MAX_SUBJECT_CHARS = 256
MAX_KID_CHARS = 256
MAX_LABEL_CHARS = 256
"""Client ids, token ids and group names: far longer than any IdP issues."""
MAX_GROUPS = 256
CLAIMED_CHARS = 200
"""How much of an unverified claim a rejection record keeps."""

CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
"""RFC 7518, section 3.4: each ECDSA algorithm is bound to one curve."""
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA", *CURVES})
"""The algorithms a configuration may allow: asymmetric only, for keys a JWKS publishes."""
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
"""RFC 9068, section 2.1; media types compare case-insensitively (RFC 7515, section 4.1.9)."""
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash")
"""Claims only an ID token carries (OpenID Connect Core 1.0, sections 2 and 3.1.3.6)."""

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey

REASONS = frozenset(
    {
        "token_too_large",
        "token_missing",
        "token_malformed",
        "token_encrypted",
        "segment_count",
        "header_malformed",
        "alg_not_allowed",
        "typ_not_allowed",
        "crit_unsupported",
        "token_nested",
        "kid_missing",
        "kid_invalid",
        "payload_malformed",
        "id_token",
        "org_authorization_server",
        "iss_mismatch",
        "kid_unknown",
        "alg_key_mismatch",
        "signature_invalid",
        "aud_mismatch",
        "exp_missing",
        "exp_invalid",
        "expired",
        "nbf_invalid",
        "nbf_future",
        "iat_missing",
        "iat_invalid",
        "iat_future",
        "lifetime_too_long",
        "sub_missing",
        "sub_invalid",
        "groups_invalid",
        "cid_invalid",
        "client_id_invalid",
        "azp_invalid",
        "jti_invalid",
        # Raised by the servicer: the identity, signed as an assertion, would
        # be larger than the policy service accepts (jws.MAX_TOKEN_BYTES).
        "identity_too_large",
    }
)
"""Every reason code a rejection can carry: stable names for logs, audit and alerts."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, kw_only=True)
class VerificationKey:
    """A public key from an issuer's JWKS, usable for signatures."""

    kid: str
    key: PublicKey = field(repr=False)
    alg: str | None = None


class KeySource(Protocol):
    """Where one issuer's verification keys come from (its JWKS cache, or a fixed set)."""

    def get(self, kid: str) -> VerificationKey | None:
        """Return the key called kid, if it is known and fresh now."""
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


def fits(alg: str, key: PublicKey) -> bool:
    """Return whether key is of the type (and curve) alg signs with (RFC 7518, section 3.1)."""
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, RSAPublicKey)
    if alg in CURVES:
        return isinstance(key, EllipticCurvePublicKey) and key.curve.name == CURVES[alg]
    return alg == "EdDSA" and isinstance(key, Ed25519PublicKey)


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


def _no_constants(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON (RFC 8259, section 6).
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str | bytes) -> Any:
    """Return parsed JSON, refusing duplicate members and NaN/Infinity; ValueError otherwise."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _json_object(segment: str) -> dict[str, Any]:
    value = loads_strict(_b64url(segment).decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _segments(token: str) -> list[str]:
    # Size before anything else: no decoding work for an oversized token.
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("token_too_large", f"{len(token)} characters")
    if not token:
        raise Unauthenticated("token_missing")
    if not token.isascii():
        raise Unauthenticated("token_malformed", "non-ASCII characters")
    # A JWS in compact form has exactly three segments; a JWE has five
    # (RFC 7516, section 7.1), and we accept no encrypted token.
    parts = token.split(".")
    if len(parts) == 5:
        raise Unauthenticated("token_encrypted", "5 segments: a JWE")
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


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # RFC 7519, section 2: a NumericDate is a JSON number. bool is an int in
    # Python, and NaN or infinity would make every comparison false.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"{name}_invalid", f"{name} is not a number")
    # Only floats can be non-finite (math.isfinite would overflow on an int
    # like 10**400, which the range check below rejects instead).
    if isinstance(value, float) and not math.isfinite(value):
        raise Unauthenticated(f"{name}_invalid", f"{name} is not a number")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise Unauthenticated(f"{name}_invalid", f"{name} {value} is out of range")
    return float(value)


def _label(value: Any) -> bool:
    # What ends up in logs, Redis, assertions and the audit log: a bounded,
    # printable string (no control, bidi-override or lone surrogate characters,
    # which have no UTF-8 form and would fail later, far from this check).
    return isinstance(value, str) and len(value) <= MAX_LABEL_CHARS and value.isprintable()


def _optional_string(claims: Mapping[str, Any], *names: str) -> str:
    for name in names:
        if name in claims:
            value = claims[name]
            if not _label(value):
                raise Unauthenticated(f"{name}_invalid", f"{name} is not a printable string")
            return str(value)
    return ""


def _audiences(claims: Mapping[str, Any]) -> list[Any]:
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []


@dataclass(frozen=True, kw_only=True)
class _Parsed:
    """A token's header choices and unverified claims, after every check that needs no key."""

    alg: str
    kid: str
    issuer: str
    claims: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class AccessTokenVerifier:
    """Verifies access tokens for one audience from a fixed set of issuers, each with its keys."""

    issuers: Mapping[str, KeySource]
    audience: str
    groups_claim: str = "groups"
    algorithms: frozenset[str] = frozenset({"RS256"})
    leeway: float = 30.0
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    _verifiers: Mapping[str, Algorithm] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithms", allowed_algorithms(self.algorithms))
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0 to {MAX_LEEWAY} seconds")
        if not self.issuers or not all(self.issuers):
            raise ValueError("at least one issuer is required")
        if not self.audience or not self.groups_claim:
            raise ValueError("audience and groups_claim are required")
        # A token whose aud is its own iss is meant for the IdP itself (Okta's
        # org authorization server); an audience equal to an issuer would
        # accept those, so it is refused here rather than special-cased.
        if self.audience in self.issuers:
            raise ValueError("the audience must name this API, not an issuer")
        if not 60 <= self.max_lifetime <= 7 * 24 * 3600:
            raise ValueError("max_lifetime must be 60 seconds to 7 days")
        # Only the allowed algorithms are instantiated: even a bug elsewhere
        # cannot make this verifier check an HMAC or accept none.
        known = get_default_algorithms()
        verifiers = {name: known[name] for name in self.algorithms}
        object.__setattr__(self, "_verifiers", verifiers)

    async def authenticate(self, token: str, now: float) -> Identity:
        """Return the token's identity, refreshing its issuer's keys once if its kid is new."""
        parsed = self._parse(token)
        keys = self.issuers[parsed.issuer]
        if keys.get(parsed.kid) is None:
            await keys.ensure(parsed.kid)
        return self._verify(token, parsed, now)

    def verify(self, token: str, now: float) -> Identity:
        """Return the identity in token if it passes every check at time now."""
        return self._verify(token, self._parse(token), now)

    def _parse(self, token: str) -> _Parsed:
        # Every check that needs no key. The issuer and kid are unverified
        # here: they only choose which trusted key set to look in, so a token
        # we would reject anyway never triggers a JWKS refresh, and a key of
        # one issuer can never vouch for another's tokens.
        parts = _segments(token)
        alg, kid = self._header(parts)
        issuer, claims = self._classify(parts)
        return _Parsed(alg=alg, kid=kid, issuer=issuer, claims=claims)

    def _verify(self, token: str, parsed: _Parsed, now: float) -> Identity:
        key = self._key(parsed.issuer, parsed.kid, parsed.alg)
        self._check_signature(token, key.key, parsed.alg)
        # From here the claims are the signed ones: strict, canonical base64url
        # means the bytes we parsed are the bytes the signature covers.
        self._check_audience(parsed.claims)
        expires = self._check_times(parsed.claims, now)
        return self._identity(parsed.issuer, parsed.claims, expires)

    def _header(self, parts: list[str]) -> tuple[str, str]:
        try:
            header = _json_object(parts[0])
        except (ValueError, RecursionError) as exc:
            raise Unauthenticated("header_malformed", str(exc)[:100]) from exc
        # Algorithm allow-list, compared exactly: "none", "NONE" and every HS*
        # are absent from it by construction (RFC 8725, section 3.1;
        # CVE-2015-9235 alg none, CVE-2016-10555 and CVE-2022-29217 key confusion).
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthenticated("alg_not_allowed", repr(alg)[:40])
        # Explicit typing (RFC 8725, section 3.11; RFC 9068, section 2.1): an
        # access token is untyped or at+jwt; an ID token, a logout token or a
        # JWT of another kind is not accepted as one.
        if "typ" in header:
            typ = header["typ"]
            if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
                raise Unauthenticated("typ_not_allowed", repr(typ)[:40])
        # We implement no extension, so a token that says one is critical must
        # be rejected (RFC 7515, section 4.1.11).
        if "crit" in header:
            raise Unauthenticated("crit_unsupported", repr(header["crit"])[:60])
        # A nested JWT's signature vouches for another token, not for claims
        # (RFC 7519, section 5.2); an access token has no content type.
        if "cty" in header:
            raise Unauthenticated("token_nested", repr(header["cty"])[:40])
        # The key comes from the issuer's JWKS by kid, never from the token
        # itself: jku, x5u, jwk and x5c are ignored (RFC 8725, section 3.10).
        kid = header.get("kid")
        if kid is None or kid == "":
            raise Unauthenticated("kid_missing")
        if not isinstance(kid, str):
            raise Unauthenticated("kid_invalid", "kid is not a string")
        if len(kid) > MAX_KID_CHARS or not kid.isprintable():
            raise Unauthenticated("kid_invalid", "kid is too long or not printable")
        return alg, kid

    def _classify(self, parts: list[str]) -> tuple[str, dict[str, Any]]:
        try:
            claims = _json_object(parts[1])
        except (ValueError, RecursionError) as exc:
            raise Unauthenticated("payload_malformed", str(exc)[:100]) from exc
        # ID tokens prove a login to a client, not access to an API (OpenID
        # Connect Core 1.0, section 2; RFC 9068, section 4); they are signed by
        # the same keys, so they must be told apart by their claims.
        for name in ID_TOKEN_CLAIMS:
            if name in claims:
                raise Unauthenticated("id_token", f"carries {name}")
        iss = claims.get("iss")
        client = claims.get("cid", claims.get("client_id", claims.get("azp")))
        audiences = _audiences(claims)
        if isinstance(client, str) and client in audiences and self.audience not in audiences:
            raise Unauthenticated("id_token", "aud is the client id")
        # Okta's org authorization server issues tokens for Okta's own APIs,
        # with iss and aud both the org URL; they are not for third parties.
        if isinstance(iss, str) and iss in audiences:
            raise Unauthenticated("org_authorization_server", repr(iss)[:120])
        # iss is compared exactly: no prefix, substring or case folding
        # (RFC 7519, section 4.1.1; CVE-2024-53861 was a substring match).
        if not isinstance(iss, str) or iss not in self.issuers:
            raise Unauthenticated("iss_mismatch", repr(iss)[:120])
        return iss, claims

    def _key(self, issuer: str, kid: str, alg: str) -> VerificationKey:
        key = self.issuers[issuer].get(kid)
        if key is None:
            raise Unauthenticated("kid_unknown", repr(kid)[:80])
        # A key is for one algorithm when its JWK says so, and always for one
        # key type and curve (RFC 8725, section 3.1).
        if (key.alg is not None and key.alg != alg) or not fits(alg, key.key):
            raise Unauthenticated("alg_key_mismatch", f"key is {key.alg or '-'}, token says {alg}")
        return key

    def _check_signature(self, token: str, key: PublicKey, alg: str) -> None:
        # The signature, by PyJWT's implementation of exactly one algorithm
        # from our allow-list, over the exact bytes we parsed, with a key
        # object (never PEM bytes, which an HMAC could be tricked into using).
        # The rest of PyJWT's decode would only re-parse what we have checked.
        signing_input, _, signature = token.rpartition(".")
        try:
            raw = _b64url(signature)
        except ValueError as exc:
            raise Unauthenticated("signature_invalid", "not canonical base64url") from exc
        try:
            valid = self._verifiers[alg].verify(signing_input.encode(), key, raw)
        except (ValueError, TypeError) as exc:  # a signature of the wrong shape for the key
            raise Unauthenticated("signature_invalid", type(exc).__name__) from exc
        if not valid:
            raise Unauthenticated("signature_invalid")

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        # A token for another API must not work here (RFC 7519, section
        # 4.1.3; RFC 8725, section 3.9). A list naming us and another audience
        # is rejected too: a token good at two services can be replayed by
        # either against the other.
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(audiences, list)
            or not audiences
            or any(a != self.audience for a in audiences)
        ):
            raise Unauthenticated("aud_mismatch", repr(aud)[:120])

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        # Times, against the now we were given, with a small leeway for clock
        # skew (RFC 7519, sections 4.1.4 to 4.1.6). exp and iat are required:
        # without iat a token's lifetime cannot be bounded.
        expires = _numeric_date(claims, "exp")
        if expires is None:
            raise Unauthenticated("exp_missing")
        issued = _numeric_date(claims, "iat")
        if issued is None:
            raise Unauthenticated("iat_missing")
        not_before = _numeric_date(claims, "nbf")
        if now >= expires + self.leeway:
            raise Unauthenticated("expired", f"exp {expires:.0f}, now {now:.0f}")
        if not_before is not None and not_before > now + self.leeway:
            raise Unauthenticated("nbf_future", f"nbf {not_before:.0f}, now {now:.0f}")
        if issued > now + self.leeway:
            raise Unauthenticated("iat_future", f"iat {issued:.0f}, now {now:.0f}")
        # A token minted to live for months is a standing credential by another
        # name; the issuer's policy should not be the only bound.
        if expires - issued > self.max_lifetime:
            raise Unauthenticated("lifetime_too_long", f"{expires - issued:.0f}s")
        return expires

    def _identity(self, issuer: str, claims: Mapping[str, Any], expires: float) -> Identity:
        # Who: a non-empty subject, groups as a list of strings (a bare string
        # is rejected rather than read as one group or as characters).
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
        if len(groups) > MAX_GROUPS or not all(_label(g) for g in groups):
            raise Unauthenticated("groups_invalid", f"{self.groups_claim}: too many or unprintable")
        return Identity(
            subject=subject,
            # Okta names the client in `cid`; other issuers use client_id (RFC
            # 9068, section 2.2) or azp.
            client_id=_optional_string(claims, "cid", "client_id", "azp"),
            groups=tuple(sorted(set(groups))),
            token_expires_at=expires,
            issuer=issuer,
            token_id=_optional_string(claims, "jti"),
        )
