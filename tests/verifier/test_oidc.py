"""Discovery and the JWKS cache against a real HTTPS dev IdP, and the key rules."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from jitgate.common.errors import ConfigError, Unauthenticated, Unavailable
from jitgate.devstack import idp, idp_http, pki
from jitgate.verifier.oidc import (
    MAX_KEYS,
    HttpsGetter,
    JwksCache,
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
        refresh_interval=300,
        unknown_kid_cooldown=30,
        retry_interval=1,
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
    verifier = AccessTokenVerifier(issuer=idp_server.issuer, audience=idp.AUDIENCE, keys=cache)
    token = idp_server.idp.access_token("deploy-bot", now=NOW)
    assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"


async def test_an_unknown_kid_triggers_one_refresh_then_is_rejected(
    idp_server: idp_http.IdpServer, getter: HttpsGetter
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    verifier = AccessTokenVerifier(issuer=idp_server.issuer, audience=idp.AUDIENCE, keys=cache)
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
        verifier = AccessTokenVerifier(issuer=rotated.issuer, audience=idp.AUDIENCE, keys=cache)
        token = rotated.idp.access_token("deploy-bot", now=NOW)
        assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"
        assert cache.kids == {rotated.idp.kid} != {old_kid}


async def test_a_failed_fetch_keeps_the_cached_keys(
    idp_server: idp_http.IdpServer, getter: HttpsGetter, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    cache = _cache(idp_server, getter, clock)
    verifier = AccessTokenVerifier(issuer=idp_server.issuer, audience=idp.AUDIENCE, keys=cache)
    assert await cache.refresh()
    token = idp_server.idp.access_token("deploy-bot", now=NOW)
    idp_server.stop()
    clock.advance(600)
    with caplog.at_level(logging.WARNING, logger="jitgate.verifier.oidc"):
        assert not await cache.refresh()
    assert "keeping 1 cached keys" in caplog.text
    assert cache.kids == {idp_server.idp.kid}
    assert (await verifier.authenticate(token, NOW)).subject == "deploy-bot"
    # An unknown kid while the IdP is down is still a plain rejection.
    with pytest.raises(Unauthenticated) as caught:
        await verifier.authenticate(idp_server.idp.mint({"sub": "x"}, kid="other"), NOW)
    assert caught.value.check == "kid_unknown"


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
        ({"kty": "EC"}, "not RSA"),
        ({"d": "AQAB"}, "private"),
        ({"alg": "HS256"}, "not an RSA signature algorithm"),
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
