"""Discovery and the JWKS cache against a real HTTPS dev IdP, and the key rules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from jitgate.common.errors import ConfigError, Unauthenticated, Unavailable
from jitgate.devstack import idp, idp_http, pki
from jitgate.verifier.oidc import (
    MAX_DOCUMENT_BYTES,
    MAX_KEYS,
    CachePolicy,
    HttpsGetter,
    JwksCache,
    cache_max_age,
    discover,
    parse_jwks,
)
from jitgate.verifier.tokens import AccessTokenVerifier

from .conftest import NOW, FakeClock

Reply = tuple[int, dict[str, str], bytes]


@contextmanager
def canned_https(dev_pki: pki.DevPki, reply: Callable[[str, str], Reply]) -> Iterator[str]:
    """An HTTPS server with the idp certificate answering reply(base, path); yields its base."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = dev_pki.files("idp")
    context.load_cert_chain(files.cert, files.key)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = reply(base, self.path)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    base = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()


def _json(document: object) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()


@pytest.fixture
def getter(dev_pki: pki.DevPki) -> HttpsGetter:
    return HttpsGetter(ca_bundle=dev_pki.ca, timeout=2.0)


def _cache(server: idp_http.IdpServer, getter: HttpsGetter, clock: FakeClock) -> JwksCache:
    return JwksCache(
        issuer=server.issuer,
        getter=getter,
        clock=clock,
        policy=CachePolicy(default=300, unknown_kid_cooldown=30, retry_interval=1),
    )


# Discovery.


def test_discovery_finds_the_jwks(idp_server: idp_http.IdpServer, getter: HttpsGetter) -> None:
    metadata = discover(idp_server.issuer, getter)
    assert metadata.issuer == idp_server.issuer
    assert metadata.jwks_uri == f"{idp_server.issuer}/v1/keys"


def test_a_document_naming_another_issuer_is_rejected(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    # Same server, reached as localhost: the document still names 127.0.0.1,
    # and OpenID Connect Discovery 1.0, section 4.3 wants them identical.
    as_localhost = idp_server.issuer.replace("127.0.0.1", "localhost")
    with pytest.raises(Unavailable, match="names issuer"):
        discover(as_localhost, getter)
    with pytest.raises(Unavailable, match="names issuer"):
        discover(idp_server.issuer + "/", getter)


def test_plain_http_is_refused_without_a_request(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    before = sum(idp_server.requests.values())
    with pytest.raises(Unavailable, match="https"):
        getter.get_json(idp_server.issuer.replace("https://", "http://") + "/v1/keys")
    assert sum(idp_server.requests.values()) == before
    with pytest.raises(ConfigError, match="https"):
        JwksCache(issuer=idp_server.issuer.replace("https://", "http://"), getter=getter)


def test_a_server_we_do_not_trust_is_refused(idp_server: idp_http.IdpServer) -> None:
    # No CA bundle means the system's CAs, which never issued the dev certificate.
    with pytest.raises(Unavailable, match="certificate"):
        HttpsGetter(timeout=2).get_json(f"{idp_server.issuer}/v1/keys")


def test_a_missing_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA bundle"):
        HttpsGetter(ca_bundle=tmp_path / "missing.pem")


def test_redirects_are_not_followed(dev_pki: pki.DevPki, getter: HttpsGetter) -> None:
    followed: list[str] = []

    def reply(base: str, path: str) -> Reply:
        if path == "/elsewhere":
            followed.append(path)
            return _json({"keys": []})
        return 302, {"Location": f"{base}/elsewhere"}, b""

    with canned_https(dev_pki, reply) as base, pytest.raises(Unavailable, match="302"):
        getter.get_json(f"{base}/keys")
    assert followed == []


def test_an_oversized_document_is_refused(dev_pki: pki.DevPki) -> None:
    small = HttpsGetter(ca_bundle=dev_pki.ca, max_bytes=1024)
    big = {"keys": [], "padding": "x" * 4096}
    oversized = canned_https(dev_pki, lambda base, path: _json(big))
    with oversized as base, pytest.raises(Unavailable, match="larger than 1024"):
        small.get_json(f"{base}/keys")


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b""])
def test_a_document_that_is_not_a_json_object_is_refused(
    dev_pki: pki.DevPki, getter: HttpsGetter, body: bytes
) -> None:
    garbage = canned_https(dev_pki, lambda base, path: (200, {}, body))
    with garbage as base, pytest.raises(Unavailable, match="JSON"):
        getter.get_json(f"{base}/keys")


@pytest.mark.parametrize(
    "jwks_uri",
    ["http://127.0.0.1:1/keys", "https://127.0.0.1:99999/keys", "https://[::1/keys", "/v1/keys", 7],
)
def test_a_jwks_uri_that_is_not_https_is_refused(
    dev_pki: pki.DevPki, getter: HttpsGetter, jwks_uri: object
) -> None:
    def reply(base: str, path: str) -> Reply:
        return _json({"issuer": base, "jwks_uri": jwks_uri})

    with canned_https(dev_pki, reply) as base, pytest.raises(Unavailable, match="jwks_uri"):
        discover(base, getter)


# The cache.


async def test_keys_load_and_verify_a_token(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    cache = _cache(idp_server, getter, FakeClock())
    assert await cache.refresh()
    assert cache.kids == {idp_server.idp.kid}
    verifier = AccessTokenVerifier(issuers={idp_server.issuer: cache}, audience=idp.AUDIENCE)
    token = idp_server.idp.access_token("deploy-bot", now=NOW)
    assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"


async def test_an_unknown_kid_triggers_one_refresh_then_is_rejected(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    verifier = AccessTokenVerifier(issuers={idp_server.issuer: cache}, audience=idp.AUDIENCE)
    assert await cache.refresh()
    assert idp_server.requests["keys"] == 1
    clock.advance(30)  # a refresh just happened: none is due for any kid until the cooldown
    claims = idp_server.idp.claims(idp_server.idp.agents["deploy-bot"], now=NOW, scopes=())
    forged = idp_server.idp.mint(claims, kid="not-a-key")
    for _ in range(3):
        with pytest.raises(Unauthenticated) as caught:
            await verifier.authenticate(forged, NOW)
        assert caught.value.check == "kid_unknown"
    assert idp_server.requests["keys"] == 2  # one refresh for three tokens
    clock.advance(30)
    with pytest.raises(Unauthenticated):
        await verifier.authenticate(forged, NOW)
    assert idp_server.requests["keys"] == 3  # the cooldown passed: one more


async def test_a_storm_of_unknown_kids_costs_one_fetch(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    assert await cache.refresh()
    clock.advance(30)
    await asyncio.gather(*(cache.ensure(f"random-{n}") for n in range(200)))
    assert idp_server.requests["keys"] == 2


async def test_a_rotated_key_is_picked_up_by_its_kid(
    dev_pki: pki.DevPki, idp_server: idp_http.IdpServer, getter: HttpsGetter, tmp_path: Path
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    assert await cache.refresh()
    old_kid = idp_server.idp.kid
    clock.advance(30)
    port = int(idp_server.issuer.split(":")[2].split("/")[0])
    idp_server.stop()
    files = dev_pki.files("idp")
    with idp_http.IdpServer(
        state_dir=tmp_path, tls_cert=files.cert, tls_key=files.key, port=port
    ) as rotated:
        verifier = AccessTokenVerifier(issuers={rotated.issuer: cache}, audience=idp.AUDIENCE)
        token = rotated.idp.access_token("deploy-bot", now=NOW)
        assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"
        assert cache.kids == {rotated.idp.kid} != {old_kid}


async def test_a_failed_fetch_keeps_the_cached_keys(
    idp_server: idp_http.IdpServer, getter: HttpsGetter, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    verifier = AccessTokenVerifier(issuers={idp_server.issuer: cache}, audience=idp.AUDIENCE)
    assert await cache.refresh()
    token = idp_server.idp.access_token("deploy-bot", now=NOW)
    idp_server.stop()
    clock.advance(600)
    with caplog.at_level(logging.WARNING, logger="jitgate.verifier.oidc"):
        assert not await cache.refresh()
    assert "keeping 1 cached keys" in caplog.text
    assert cache.kids == {idp_server.idp.kid}
    assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"
    # An unknown kid while refreshes fail cannot be judged: it may be the
    # IdP's newly rotated key. The agent is told to retry, not that its token is bad.
    rotated = idp_server.idp.mint({"iss": idp_server.issuer, "sub": "x"}, kid="other")
    with pytest.raises(Unavailable, match="unknown and refresh failing"):
        await verifier.authenticate(rotated, NOW)


async def test_no_keys_and_no_idp_is_unavailable(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    idp_server.stop()
    with pytest.raises(Unavailable) as caught:
        await cache.ensure("any")
    assert caught.value.dependency == "jwks"
    # Retried at most once per retry interval, however many requests come.
    with pytest.raises(Unavailable):
        await cache.ensure("any")
    clock.advance(1)
    with pytest.raises(Unavailable):
        await cache.ensure("any")


async def test_keys_load_once_the_idp_is_back(
    dev_pki: pki.DevPki, idp_server: idp_http.IdpServer, idp_state: Path, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    port = int(idp_server.issuer.split(":")[2].split("/")[0])
    idp_server.stop()
    with pytest.raises(Unavailable):
        await cache.ensure(idp_server.idp.kid)
    files = dev_pki.files("idp")
    with idp_http.IdpServer(
        state_dir=idp_state, tls_cert=files.cert, tls_key=files.key, port=port
    ) as server:
        clock.advance(1)
        await cache.ensure(server.idp.kid)
        assert cache.get(server.idp.kid) is not None


# Which keys are usable.


def _rsa(bits: int = 2048) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return idp.rsa_jwk(key.public_key())


@pytest.fixture(scope="module")
def good_jwk() -> dict[str, Any]:
    return {**_rsa(), "kid": "good", "use": "sig", "alg": "RS256"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kid": None}, "no usable kid"),
        ({"kid": ""}, "no usable kid"),
        ({"kid": ["a"]}, "no usable kid"),
        ({"kid": {"a": 1}}, "no usable kid"),
        ({"use": "enc"}, "not sig"),
        ({"kty": "oct", "k": "c2VjcmV0"}, "private or symmetric"),
        ({"kty": "EC"}, "not a supported curve"),
        ({"kty": "oct"}, "not an asymmetric key type"),
        ({"d": "AQAB"}, "private"),
        ({"alg": "HS256"}, "not a signature algorithm for this key"),
        ({"alg": "ES256"}, "not a signature algorithm for this key"),
        ({"alg": ["RS256"]}, "not a signature algorithm for this key"),
        ({"kty": "EC", "crv": ["P-256"]}, "not a supported curve"),
        ({"kty": ["RSA"]}, "not an asymmetric key type"),
        ({"key_ops": ["encrypt"]}, "key_ops"),
        ({"n": "AQAB=="}, "base64url"),
        ({"n": 7}, "base64url"),
        ({"n": "AQ!AB"}, "base64url"),
        ({"n": "_" * 2000}, "12000 bits"),
        ({"e": "AAAC"}, "e must be"),
    ],
)
def test_unusable_keys_are_ignored_and_logged(
    good_jwk: dict[str, Any],
    change: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = {**good_jwk, "kid": "bad", **change}
    with caplog.at_level(logging.WARNING, logger="jitgate.verifier.oidc"):
        keys = parse_jwks({"keys": [good_jwk, bad]})
    assert set(keys) == {"good"}
    assert reason in caplog.text


def test_an_rsa_key_under_2048_bits_is_ignored(
    good_jwk: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    weak = {**_rsa(1024), "kid": "weak"}
    with caplog.at_level(logging.WARNING, logger="jitgate.verifier.oidc"):
        assert set(parse_jwks({"keys": [good_jwk, weak]})) == {"good"}
    assert "1024 bits" in caplog.text


def test_a_duplicate_kid_uses_neither_key(good_jwk: dict[str, Any]) -> None:
    decoy = {**_rsa(), "kid": "good"}
    assert parse_jwks({"keys": [good_jwk, decoy]}) == {}


def test_a_key_without_use_or_alg_is_usable(good_jwk: dict[str, Any]) -> None:
    bare = {k: v for k, v in good_jwk.items() if k not in ("use", "alg")}
    assert parse_jwks({"keys": [bare]})["good"].alg is None


@pytest.mark.parametrize(
    "document", [{}, {"keys": "nope"}, {"keys": [{"kid": str(n)} for n in range(MAX_KEYS + 1)]}]
)
def test_a_key_set_of_the_wrong_shape_is_unavailable(document: dict[str, Any]) -> None:
    with pytest.raises(Unavailable):
        parse_jwks(document)


# Cache-Control, staleness, rotation and hostile endpoints, against a JWKS
# server whose behaviour each test sets.


class JwksServer:
    """An HTTPS OIDC issuer (discovery and JWKS only) whose keys and failures tests set."""

    def __init__(self) -> None:
        self.signing: dict[str, rsa.RSAPrivateKey] = {}
        self.mode = "ok"
        self.cache_control: str | None = None
        self.delay = 0.0
        self.fetches = 0
        self.base = ""

    @property
    def issuer(self) -> str:
        return f"{self.base}/oauth2/default"

    def add_key(self, kid: str) -> rsa.RSAPrivateKey:
        self.signing[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.signing[kid]

    def token(self, kid: str, now: float = NOW, **claims: Any) -> str:
        body = {"iss": self.issuer, "aud": idp.AUDIENCE, "sub": "agent", "iat": int(now)}
        body.update({"exp": int(now) + 3600, **claims})
        return idp.mint(body, key=self.signing[kid], kid=kid)

    def reply(self, base: str, path: str) -> Reply:
        if path.endswith("/.well-known/openid-configuration"):
            return _json({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/keys"})
        self.fetches += 1
        time.sleep(self.delay)
        if self.mode == "down":
            return 503, {}, b"maintenance"
        if self.mode == "garbage":
            return 200, {"Content-Type": "application/json"}, b'{"keys": [{"kty": "RSA"'
        if self.mode == "huge":
            return _json({"keys": [], "padding": "x" * (MAX_DOCUMENT_BYTES + 1)})
        keys = [
            {**idp.rsa_jwk(key.public_key()), "kid": kid, "use": "sig", "alg": "RS256"}
            for kid, key in self.signing.items()
        ]
        status, headers, body = _json({"keys": keys})
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        return status, headers, body


@pytest.fixture
def jwks(dev_pki: pki.DevPki) -> Iterator[JwksServer]:
    server = JwksServer()
    server.add_key("k1")
    with canned_https(dev_pki, server.reply) as base:
        server.base = base
        yield server


def _verifier(cache: JwksCache) -> AccessTokenVerifier:
    return AccessTokenVerifier(issuers={cache.issuer: cache}, audience=idp.AUDIENCE)


POLICY = CachePolicy(default=300, floor=60, ceiling=3600, max_stale=7200, unknown_kid_cooldown=30)


@pytest.mark.parametrize(
    ("header", "lifetime"),
    [
        (None, 300),
        ("max-age=600", 600),
        ("public, max-age=10", 60),
        ("max-age=999999", 3600),
        ("no-store", 60),
        ("no-cache, max-age=900", 60),
        ("max-age=900, max-age=120", 120),
        ("max-age=banana", 300),
    ],
)
async def test_cache_control_sets_the_next_refresh_within_the_bounds(
    jwks: JwksServer, getter: HttpsGetter, header: str | None, lifetime: float
) -> None:
    jwks.cache_control = header
    clock = FakeClock()
    cache = JwksCache(issuer=jwks.issuer, getter=getter, clock=clock, policy=POLICY)
    assert await cache.refresh()
    assert cache.due_in() == lifetime
    clock.advance(lifetime - 1)
    assert cache.due_in() == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        (["max-age=0"], 0.0),
        (["MAX-AGE = 42 "], 42.0),
        (['max-age="77"'], 77.0),
        (["private", "max-age=5"], 5.0),
        (["max-age=-5"], None),
        (["max-age=" + "9" * 40], None),
        (["no-store"], 0.0),
    ],
)
def test_cache_max_age_reads_cache_control(headers: list[str], expected: float | None) -> None:
    assert cache_max_age(headers) == expected


async def test_the_background_refresh_follows_cache_control(
    jwks: JwksServer, getter: HttpsGetter
) -> None:
    jwks.cache_control = "max-age=0"
    fast = CachePolicy(default=0.2, floor=0.2, ceiling=0.2, max_stale=60)
    cache = JwksCache(issuer=jwks.issuer, getter=getter, policy=fast)
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # One fetch at start, then one every 0.2 s: about 5, never a tight loop.
    assert 3 <= jwks.fetches <= 7


async def test_a_rotated_in_key_is_accepted_after_one_refresh_and_a_removed_one_rejected(
    jwks: JwksServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = JwksCache(issuer=jwks.issuer, getter=getter, clock=clock, policy=POLICY)
    verifier = _verifier(cache)
    old_token = jwks.token("k1")
    assert (await verifier.authenticate(old_token, NOW)).subject == "agent"
    assert jwks.fetches == 1
    # The IdP publishes k2 and signs with it: the first k2 token costs one refresh.
    jwks.add_key("k2")
    clock.advance(30)
    assert (await verifier.authenticate(jwks.token("k2"), NOW)).subject == "agent"
    assert jwks.fetches == 2
    # The IdP retires k1: tokens it signed fail once the next refresh has run.
    del jwks.signing["k1"]
    assert (await verifier.authenticate(old_token, NOW)).subject == "agent"
    clock.advance(POLICY.default)
    assert await cache.refresh()
    with pytest.raises(Unauthenticated) as caught:
        await verifier.authenticate(old_token, NOW)
    assert caught.value.check == "kid_unknown"
    assert cache.kids == {"k2"}


async def test_a_storm_of_a_thousand_random_kids_costs_at_most_two_fetches(
    jwks: JwksServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = JwksCache(issuer=jwks.issuer, getter=getter, clock=clock, policy=POLICY)
    verifier = _verifier(cache)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {"iss": jwks.issuer, "aud": idp.AUDIENCE, "sub": "x", "iat": NOW, "exp": NOW + 60}
    storm = [idp.mint(claims, key=forger, kid=secrets.token_hex(8)) for _ in range(1000)]

    async def attempt(token: str) -> str:
        try:
            await verifier.authenticate(token, NOW)
        except Unauthenticated as exc:
            return exc.check
        return "accepted"

    # Cold cache: the first token loads the keys, the rest find theirs unknown.
    outcomes = await asyncio.gather(*(attempt(token) for token in storm))
    assert set(outcomes) == {"kid_unknown"}
    assert jwks.fetches <= 2
    # Warm cache, cooldown passed: a second storm costs one more fetch at most.
    clock.advance(POLICY.unknown_kid_cooldown)
    before = jwks.fetches
    outcomes = await asyncio.gather(*(attempt(token) for token in storm))
    assert set(outcomes) == {"kid_unknown"}
    assert jwks.fetches - before <= 1


@pytest.mark.parametrize("mode", ["down", "garbage", "huge"])
async def test_a_failing_endpoint_is_survived_until_the_staleness_bound(
    jwks: JwksServer, getter: HttpsGetter, mode: str
) -> None:
    clock = FakeClock()
    cache = JwksCache(issuer=jwks.issuer, getter=getter, clock=clock, policy=POLICY)
    verifier = _verifier(cache)
    assert await cache.refresh()
    jwks.mode = mode
    # Within the bound: refreshes fail, the last good keys still verify.
    clock.advance(POLICY.max_stale)
    assert not await cache.refresh()
    token = jwks.token("k1", now=clock.now)
    assert (await verifier.authenticate(token, clock.now)).subject == "agent"
    assert cache.kids == {"k1"}
    # Past it: nothing verifies, and the agent is told "unavailable", not "accepted".
    clock.advance(1)
    token = jwks.token("k1", now=clock.now)
    with pytest.raises(Unavailable, match="last fetched over 7200s ago"):
        await verifier.authenticate(token, clock.now)
    assert cache.kids == frozenset()
    # The endpoint recovers: the next attempt after the retry interval loads keys again.
    jwks.mode = "ok"
    clock.advance(POLICY.retry_interval)
    assert (await verifier.authenticate(token, clock.now)).subject == "agent"


async def test_a_slow_endpoint_is_given_up_on_within_the_timeout(
    jwks: JwksServer, dev_pki: pki.DevPki
) -> None:
    impatient = HttpsGetter(ca_bundle=dev_pki.ca, timeout=0.5)
    jwks.delay = 2.0
    cache = JwksCache(issuer=jwks.issuer, getter=impatient, policy=POLICY)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="slower than"):
        await cache.ensure("k1")
    assert time.monotonic() - started < 1.5


async def test_a_dripping_endpoint_is_cut_off_at_the_deadline(dev_pki: pki.DevPki) -> None:
    # A server that sends a byte at a time, each within the read timeout,
    # must still not hold a fetch open past the overall deadline.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = dev_pki.files("idp")
    context.load_cert_chain(files.cert, files.key)

    class Drip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        getter = HttpsGetter(ca_bundle=dev_pki.ca, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="slower than"):
            await asyncio.to_thread(
                getter.get_json, f"https://127.0.0.1:{server.server_address[1]}/k"
            )
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()
        server.server_close()


async def test_a_slow_refresh_is_shared_by_every_caller_and_survives_their_cancellation(
    jwks: JwksServer, getter: HttpsGetter
) -> None:
    # A fetch slower than the cooldown: waiters join it rather than start
    # their own, and a caller that gives up (a deadline) leaves it running.
    jwks.delay = 1.2
    quick = CachePolicy(default=300, floor=60, ceiling=3600, max_stale=7200, unknown_kid_cooldown=1)
    cache = JwksCache(issuer=jwks.issuer, getter=getter, policy=quick)
    impatient = asyncio.create_task(cache.ensure("k1"))
    await asyncio.sleep(0.2)
    impatient.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await impatient
    kids = [secrets.token_hex(8) for _ in range(50)]
    await asyncio.gather(*(cache.ensure(kid) for kid in kids), return_exceptions=True)
    assert jwks.fetches == 1
    assert cache.kids == {"k1"}
    # The cooldown runs from the end of that fetch: more unknown kids now cost nothing.
    await asyncio.gather(*(cache.ensure(kid) for kid in kids))
    assert jwks.fetches == 1


async def test_a_caller_waits_for_a_hung_idp_no_longer_than_its_limit(
    jwks: JwksServer, dev_pki: pki.DevPki
) -> None:
    jwks.delay = 3.0
    getter = HttpsGetter(ca_bundle=dev_pki.ca, timeout=0.3)
    cache = JwksCache(issuer=jwks.issuer, getter=getter, policy=POLICY)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await cache.ensure("k1")
    # Discovery and the JWKS are each cut at 0.3 s; the caller's limit is 2 x 0.3 + 1.
    assert time.monotonic() - started < 1.6


async def test_headers_dripped_a_byte_at_a_time_are_cut_off_at_the_deadline(
    dev_pki: pki.DevPki,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    files = dev_pki.files("idp")
    context.load_cert_chain(files.cert, files.key)

    class DripHeaders(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for n in range(100):
                    self.wfile.write(f"X-Pad-{n}: 1\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.1)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), DripHeaders)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        getter = HttpsGetter(ca_bundle=dev_pki.ca, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="slower than"):
            await asyncio.to_thread(
                getter.get_json, f"https://127.0.0.1:{server.server_address[1]}/k"
            )
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()
        server.server_close()


# Key types other than RSA, for issuers configured with ES* or EdDSA.


def test_ec_and_okp_keys_are_read_and_off_curve_points_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    size = 32
    point = {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(p256.x.to_bytes(size, "big")),
        "y": _b64(p256.y.to_bytes(size, "big")),
    }
    off_curve = {**point, "y": _b64((p256.y ^ 1).to_bytes(size, "big"))}
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    okp = {"kty": "OKP", "crv": "Ed25519", "x": _b64(ed)}
    document = {
        "keys": [
            {**point, "kid": "ec", "alg": "ES256"},
            {**off_curve, "kid": "off"},
            {**okp, "kid": "ed", "alg": "EdDSA"},
            {**okp, "kid": "x448", "crv": "X448"},
            {**point, "kid": "short", "x": _b64(b"\x01" * 31)},
        ]
    }
    with caplog.at_level(logging.WARNING, logger="jitgate.verifier.oidc"):
        keys = parse_jwks(document)
    assert set(keys) == {"ec", "ed"}
    for kid in ("off", "x448", "short"):
        assert repr(kid) in caplog.text


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
