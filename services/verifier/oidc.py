"""The OIDC issuer's discovery document and JWKS, fetched over HTTPS and cached.

The verifier trusts keys only from the JWKS its configured issuer's discovery
document names, fetched over verified HTTPS without redirects, and keeps the
last good keys when a refresh fails: an IdP outage degrades to "no new keys",
never to "no keys" or "any key".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from jitgate.common import telemetry
from jitgate.common.clock import Clock
from jitgate.common.errors import ConfigError, Unavailable
from jitgate.common.validate import printable
from jitgate.verifier.tokens import (
    ALGORITHMS,
    MAX_KID_CHARS,
    PublicKey,
    VerificationKey,
    fits,
    loads_strict,
)

log = logging.getLogger(__name__)

REFRESHES = telemetry.meter().create_counter(
    "jitgate.jwks.refreshes", unit="{fetch}", description="JWKS refreshes, by outcome"
)

MAX_DOCUMENT_BYTES = 256 * 1024
"""Discovery documents and key sets are a few kilobytes."""
MAX_KEYS = 64
"""More keys than any issuer publishes; a bigger set is treated as garbage."""
MIN_RSA_BITS = 2048
"""RFC 7518, section 3.3: RSA keys for RS*/PS* are 2048 bits or larger."""
MAX_RSA_BITS = 8192
"""Larger moduli only cost CPU per verification; no issuer uses them."""
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def https_url(url: str, what: str) -> urllib.parse.SplitResult:
    """Return url split, or raise ConfigError unless it is https://host/... without credentials."""
    message = f"{what} {url!r} must be an https:// URL with a host and no credentials"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise ConfigError(message) from None
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise ConfigError(message)
    if port == 0:
        raise ConfigError(message)  # a port urlsplit accepts but nothing can listen on
    return parts


_MAX_AGE = re.compile(r"\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*", re.IGNORECASE)


def cache_max_age(headers: list[str]) -> float | None:
    """Return the max-age the Cache-Control headers allow, 0 for no caching, None if unsaid.

    RFC 9111, section 5.2.2: no-store and no-cache mean "fetch again"; the
    caller clamps whatever this returns between its own floor and ceiling.
    """
    ages: list[float] = []
    for header in headers:
        for directive in header.split(","):
            name = directive.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0.0
            matched = _MAX_AGE.fullmatch(directive)
            if matched:
                ages.append(float(matched.group(1)))
    # A duplicated directive is invalid (RFC 9111, section 4.2.1): take the
    # most conservative reading rather than the first.
    return min(ages) if ages else None


@dataclass(frozen=True, kw_only=True)
class Fetched:
    """A JSON document and the lifetime its response allowed, if it said one."""

    document: dict[str, Any]
    max_age: float | None


@dataclass(frozen=True, kw_only=True)
class HttpsGetter:
    """Fetches JSON documents over verified HTTPS: no redirects, bounded time and size."""

    ca_bundle: Path | None = None
    timeout: float = 5.0
    max_bytes: int = MAX_DOCUMENT_BYTES
    _context: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cafile = str(self.ca_bundle) if self.ca_bundle is not None else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA bundle {self.ca_bundle}: {exc}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        object.__setattr__(self, "_context", context)

    def get_json(self, url: str) -> dict[str, Any]:
        """Return the JSON object at url, or raise Unavailable saying why not. Blocking."""
        return self.fetch(url).document

    def fetch(self, url: str) -> Fetched:
        """Return the JSON object at url and how long it may be cached. Blocking.

        The whole fetch (connect, TLS, headers, body) ends by `timeout`: a
        watchdog shuts the socket at the deadline, so a server that drips its
        headers or body a byte at a time cannot hold the fetch open longer.
        """
        try:
            parts = https_url(url, "URL")
        except ConfigError as exc:
            raise Unavailable("oidc", str(exc)) from exc
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, context=self._context, timeout=self.timeout
        )
        expired = threading.Event()
        opened: list[socket.socket] = []

        def cut() -> None:
            expired.set()
            # Our own reference: http.client drops connection.sock once a
            # response says it will close, while the response still reads it.
            for sock in opened:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(self.timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.connect()
            opened.append(connection.sock)
            if expired.is_set():  # the deadline passed while connecting
                cut()
            connection.request("GET", path, headers={"Accept": "application/json"})
            response = connection.getresponse()
            # http.client never follows redirects, and neither do we: a 3xx is
            # an answer we do not accept, not a pointer to another host.
            if response.status != 200:
                raise Unavailable("oidc", f"GET {url} answered {response.status}")
            body = self._read(response)
            max_age = cache_max_age(response.headers.get_all("Cache-Control") or [])
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if expired.is_set():
                raise Unavailable("oidc", f"GET {url}: slower than {self.timeout}s") from exc
            raise Unavailable("oidc", f"GET {url}: {type(exc).__name__}: {exc}") from exc
        finally:
            watchdog.cancel()
            connection.close()
        if expired.is_set():  # the body may have been cut short: never parse half a key set
            raise Unavailable("oidc", f"GET {url}: slower than {self.timeout}s")
        try:
            document = loads_strict(body)
        except (ValueError, RecursionError) as exc:
            raise Unavailable("oidc", f"GET {url}: not JSON") from exc
        if not isinstance(document, dict):
            raise Unavailable("oidc", f"GET {url}: not a JSON object")
        return Fetched(document=document, max_age=max_age)

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        body = b""
        while len(body) <= self.max_bytes:
            chunk = response.read1(16 * 1024)
            if not chunk:
                return body
            body += chunk
        raise Unavailable("oidc", f"{len(body)} bytes, larger than {self.max_bytes}")


@dataclass(frozen=True, kw_only=True)
class ProviderMetadata:
    """The parts of an OpenID Provider's discovery document the verifier uses."""

    issuer: str
    jwks_uri: str


def discovery_url(issuer: str) -> str:
    """Return the discovery URL of issuer (OpenID Connect Discovery 1.0, section 4)."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def discover(issuer: str, getter: HttpsGetter) -> ProviderMetadata:
    """Fetch and check issuer's discovery document. Blocking."""
    document = getter.get_json(discovery_url(issuer))
    # OpenID Connect Discovery 1.0, section 4.3: the document's issuer MUST be
    # identical to the URL it was fetched for, or one issuer could speak for
    # another (the mix-up attack).
    named = document.get("issuer")
    if named != issuer:
        raise Unavailable(
            "oidc", f"discovery document names issuer {repr(named)[:200]}, expected {issuer!r}"
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise Unavailable("oidc", "discovery document has no jwks_uri")
    try:
        https_url(jwks_uri, "jwks_uri")
    except ConfigError as exc:
        raise Unavailable("oidc", str(exc)) from exc
    return ProviderMetadata(issuer=issuer, jwks_uri=jwks_uri)


def _bytes(value: Any, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not _BASE64URL.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if size is not None and len(data) != size:
        raise ValueError(f"{len(data)} bytes where {size} belong")
    return data


def _public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """Return the public key a JWK describes (RFC 7518, section 6; RFC 8037, section 2)."""
    kty = jwk.get("kty")
    if kty == "RSA":
        n = int.from_bytes(_bytes(jwk.get("n")), "big")
        e = int.from_bytes(_bytes(jwk.get("e")), "big")
        if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
            raise ValueError(
                f"RSA key of {n.bit_length()} bits; use {MIN_RSA_BITS} to {MAX_RSA_BITS}"
            )
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise ValueError(f"crv {repr(crv)[:20]} is not a supported curve")
        curve, size = _CURVES[crv]
        x, y = (int.from_bytes(_bytes(jwk.get(c), size), "big") for c in ("x", "y"))
        # Raises ValueError for a point off the curve (the invalid-curve attack).
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise ValueError(f"crv {repr(jwk.get('crv'))[:20]} is not Ed25519")
        return Ed25519PublicKey.from_public_bytes(_bytes(jwk.get("x"), 32))
    raise ValueError(f"kty {repr(kty)[:20]} is not an asymmetric key type")


def _verification_key(jwk: Mapping[str, Any]) -> VerificationKey:
    """Return jwk as a verification key, or raise ValueError saying why it is unusable."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS or not kid.isprintable():
        raise ValueError("no usable kid")
    if _PRIVATE_MEMBERS & jwk.keys():
        # A JWKS is public; private members mean a misconfigured IdP, and a
        # symmetric `k` would be an HMAC secret (RFC 7517, section 9.1).
        raise ValueError("carries private or symmetric key material")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {repr(jwk.get('use'))[:20]} is not sig")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not include verify")
    key = _public_key(jwk)
    alg = jwk.get("alg")
    if alg is not None and (
        not isinstance(alg, str) or alg not in ALGORITHMS or not fits(alg, key)
    ):
        raise ValueError(f"alg {repr(alg)[:20]} is not a signature algorithm for this key")
    return VerificationKey(kid=kid, key=key, alg=alg)


def parse_jwks(document: Mapping[str, Any]) -> dict[str, VerificationKey]:
    """Return the usable keys of a JWKS by kid; every key left out is logged with its reason."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise Unavailable("jwks", "the JWKS has no keys array")
    if len(entries) > MAX_KEYS:
        raise Unavailable("jwks", f"the JWKS has {len(entries)} keys, more than {MAX_KEYS}")
    keys: dict[str, VerificationKey] = {}
    kids = Counter(str(e.get("kid")) for e in entries if isinstance(e, dict))
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            log.warning("JWKS key %d ignored: not an object", index)
            continue
        name = printable(str(entry.get("kid")), 80)
        if kids[str(entry.get("kid"))] > 1:
            # Two keys under one kid: whichever we picked, the other could be a
            # decoy. Use neither.
            log.warning("JWKS key %r ignored: its kid appears more than once", name)
            continue
        try:
            key = _verification_key(entry)
        except Exception as exc:  # one bad entry never costs the others: it is skipped
            log.warning("JWKS key %r ignored: %s", name, printable(str(exc), 200))
            continue
        keys[key.kid] = key
    return keys


@dataclass(frozen=True, kw_only=True)
class CachePolicy:
    """How long keys are trusted: refresh bounds, the unknown-kid cooldown and the staleness limit.

    A JWKS response's Cache-Control max-age sets the next refresh, clamped to
    [floor, ceiling]; without one, `default` applies. Keys not refreshed
    successfully for `max_stale` are no longer used at all: an IdP we cannot
    reach for that long may have revoked them.
    """

    default: float = 300.0
    floor: float = 60.0
    ceiling: float = 3600.0
    max_stale: float = 7200.0
    unknown_kid_cooldown: float = 30.0
    retry_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.default <= self.ceiling <= self.max_stale:
            raise ConfigError(
                "JWKS cache bounds must satisfy 0 < floor <= default <= ceiling <= max_stale"
            )
        if self.unknown_kid_cooldown <= 0 or self.retry_interval <= 0:
            raise ConfigError("the JWKS cooldown and retry interval must be positive")

    def lifetime(self, max_age: float | None) -> float:
        """Return how long keys from a response with this max-age go before a refresh."""
        return self.default if max_age is None else min(max(max_age, self.floor), self.ceiling)


class JwksCache:
    """One issuer's signing keys by kid, refreshed on schedule and on an unknown kid.

    One fetch at a time, shared: every caller that needs a refresh while one
    is running waits for that one (and a caller that gives up or is cancelled
    leaves it running for the others). A refresh prompted by an unknown kid
    starts at most once per cooldown after the last one ended, so a flood of
    tokens with random kids cannot turn the verifier into a load generator
    against the IdP. A failed refresh keeps the last good keys, until they are
    `max_stale` old. Times here are monotonic: a wall clock stepped back must
    not make old keys look fresh.
    """

    def __init__(
        self,
        *,
        issuer: str,
        getter: HttpsGetter,
        clock: Clock = time.monotonic,
        policy: CachePolicy | None = None,
    ) -> None:
        https_url(issuer, "OIDC issuer")
        self._issuer = issuer
        self._getter = getter
        self._clock = clock
        self._policy = policy or CachePolicy()
        # Discovery and the JWKS are two fetches, each bounded by the getter.
        self._wait_limit = 2 * getter.timeout + 1.0
        self._keys: dict[str, VerificationKey] = {}
        self._metadata: ProviderMetadata | None = None
        self._fetched_at: float | None = None
        self._lifetime = self._policy.default
        self._last_attempt: float | None = None
        self._last_ok = False
        self._last_error = "keys not loaded yet"
        self._running: asyncio.Task[bool] | None = None

    @property
    def issuer(self) -> str:
        """The issuer whose keys these are."""
        return self._issuer

    @property
    def kids(self) -> frozenset[str]:
        """The kids of the keys usable now (none once they are stale)."""
        return frozenset(self._keys) if self._fresh(self._clock()) else frozenset()

    def get(self, kid: str) -> VerificationKey | None:
        """Return the key called kid, if it is held and not stale."""
        key = self._keys.get(kid)
        return key if key is not None and self._fresh(self._clock()) else None

    def due_in(self) -> float:
        """Return the seconds until the next scheduled refresh."""
        now = self._clock()
        if self._last_attempt is None:
            return 0.0
        if not self._last_ok:
            return max(0.0, self._last_attempt + self._retry_wait(now) - now)
        assert self._fetched_at is not None
        return max(0.0, self._fetched_at + self._lifetime - now)

    async def ensure(self, kid: str) -> None:
        """Refresh once for an unknown kid unless one ended within the cooldown.

        Raises Unavailable when no fresh keys are held, or when the kid is
        still unknown and the last refresh failed: a token signed by a key the
        IdP just rotated in must hear "try again", not "bad token".
        """
        now = self._clock()
        if kid in self._keys and self._fresh(now):
            return
        fresh = self._fresh(now)
        wait = self._policy.unknown_kid_cooldown if fresh else self._retry_wait(now)
        if self._running is None and (
            self._last_attempt is None or now - self._last_attempt >= wait
        ):
            self._start()
        if self._running is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._running), self._wait_limit)
            except TimeoutError:
                raise Unavailable(
                    "jwks", f"{self._issuer} is slower than {self._wait_limit}s"
                ) from None
        if not self._fresh(self._clock()):
            raise Unavailable("jwks", self._unusable_reason())
        if kid not in self._keys and not self._last_ok:
            raise Unavailable(
                "jwks", f"kid {kid[:80]!r} unknown and refresh failing: {self._last_error}"
            )

    async def refresh(self) -> bool:
        """Fetch the keys now (or join the fetch running); whether it worked. Failure keeps keys."""
        if self._running is None:
            self._start()
        assert self._running is not None
        return await asyncio.shield(self._running)

    async def run(self) -> None:
        """Refresh whenever due until cancelled: on schedule, and sooner while failing."""
        while True:
            if self.due_in() <= 0:
                await self.refresh()
            await asyncio.sleep(max(self.due_in(), 0.05))

    def _retry_wait(self, now: float) -> float:
        # Usable keys: no hurry, retry at the cooldown. None (start-up, or past
        # max_stale): every request fails, so retry at the short interval.
        if self._fresh(now):
            return self._policy.unknown_kid_cooldown
        return self._policy.retry_interval

    def _start(self) -> None:
        self._running = asyncio.create_task(self._attempt(), name=f"jwks {self._issuer}")

    async def _attempt(self) -> bool:
        try:
            return await self._refresh()
        finally:
            # The cooldown runs from the end of an attempt, however long it took.
            self._last_attempt = self._clock()
            self._running = None

    def _fresh(self, now: float) -> bool:
        return (
            bool(self._keys)
            and self._fetched_at is not None
            and now - self._fetched_at <= self._policy.max_stale
        )

    def _unusable_reason(self) -> str:
        if self._keys:
            return f"keys last fetched over {self._policy.max_stale:.0f}s ago: {self._last_error}"
        return self._last_error

    async def _refresh(self) -> bool:
        try:
            metadata = self._metadata
            if metadata is None:
                metadata = await asyncio.to_thread(discover, self._issuer, self._getter)
            fetched = await asyncio.to_thread(self._getter.fetch, metadata.jwks_uri)
            keys = parse_jwks(fetched.document)
            if not keys:
                raise Unavailable("jwks", f"{metadata.jwks_uri} has no usable keys")
        except Exception as exc:  # whatever went wrong, the cache stays as it was
            # Discover again next time: the issuer may have moved its JWKS.
            self._metadata = None
            if not isinstance(exc, Unavailable):
                log.exception("unexpected error refreshing the JWKS of %s", self._issuer)
            self._last_error = exc.detail if isinstance(exc, Unavailable) else type(exc).__name__
            self._last_ok = False
            log.warning(
                "JWKS refresh for %s failed, keeping %d cached keys: %s",
                self._issuer,
                len(self._keys),
                self._last_error,
            )
            REFRESHES.add(1, {"jitgate.outcome": "failed"})
            return False
        self._metadata = metadata
        if not self._last_ok or keys.keys() != self._keys.keys():
            log.info("JWKS for %s: keys %s", self._issuer, ", ".join(sorted(keys)))
        self._keys = keys
        self._fetched_at = self._clock()
        self._lifetime = self._policy.lifetime(fetched.max_age)
        self._last_ok = True
        REFRESHES.add(1, {"jitgate.outcome": "ok"})
        return True
