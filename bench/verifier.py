"""Access-token verification per second on one core, beside its primitives; and the kid storm.

Run: `make bench-verifier` (`make bench` runs every benchmark), or
`.venv/bin/python bench/verifier.py [SECONDS]`.
Three rows, measured one after another in this process (one core): the bare
RSA signature check (cryptography), PyJWT's whole decode of the same token,
and jitgate's full rule set (which parses once and calls PyJWT's RS256
implementation for the signature alone). Their ratios show what the rules
cost over the primitive they wrap. Then 1,000 tokens with random kids are
verified concurrently against a real HTTPS JWKS endpoint on loopback,
counting the fetches they cause.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from jitgate.common.errors import Unauthenticated
from jitgate.devstack import idp, idp_http, pki
from jitgate.verifier.oidc import CachePolicy, HttpsGetter, JwksCache
from jitgate.verifier.tokens import AccessTokenVerifier, VerificationKey

NOW = 1_800_000_000.0
ISSUER = "https://idp.example/oauth2/default"


class FixedKeys:
    """The cached-keys case: every lookup hits."""

    def __init__(self, key: VerificationKey) -> None:
        self._key = key

    def get(self, kid: str) -> VerificationKey | None:
        return self._key if kid == self._key.kid else None

    async def ensure(self, kid: str) -> None:
        return None


def _rate(call: Callable[[], object], seconds: float) -> float:
    for _ in range(200):
        call()
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            call()
        count += 100
    return count / (time.perf_counter() - started)


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def throughput(seconds: float) -> list[tuple[str, float]]:
    """Return (name, verifications per second) for the three layers."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = idp.Idp(issuer=ISSUER, key=key, agents=idp.load_agents())
    token = issuer.access_token("deploy-bot", now=NOW)
    public = key.public_key()
    header, payload, signature = token.split(".")
    signing_input, raw_signature = f"{header}.{payload}".encode(), _b64decode(signature)
    verifier = AccessTokenVerifier(
        issuers={ISSUER: FixedKeys(VerificationKey(kid=issuer.kid, key=public, alg="RS256"))},
        audience=idp.AUDIENCE,
    )
    decoder = jwt.PyJWS(algorithms=["RS256"])
    assert verifier.verify(token, NOW).subject == "deploy-bot"
    return [
        (
            "RSA-2048 PKCS#1 v1.5 verify (cryptography)",
            _rate(
                lambda: public.verify(
                    raw_signature, signing_input, padding.PKCS1v15(), hashes.SHA256()
                ),
                seconds,
            ),
        ),
        (
            "PyJWT PyJWS.decode_complete (parse and signature, no claims)",
            _rate(lambda: decoder.decode_complete(token, public, algorithms=["RS256"]), seconds),
        ),
        (
            "jitgate AccessTokenVerifier.verify (every rule)",
            _rate(lambda: verifier.verify(token, NOW), seconds),
        ),
    ]


async def _storm(server: idp_http.IdpServer, getter: HttpsGetter, n: int) -> tuple[int, int, float]:
    cache = JwksCache(issuer=server.issuer, getter=getter, policy=CachePolicy())
    verifier = AccessTokenVerifier(issuers={server.issuer: cache}, audience=idp.AUDIENCE)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = server.idp.claims(server.idp.agents["deploy-bot"], now=time.time(), scopes=())
    tokens = [idp.mint(claims, key=forger, kid=secrets.token_hex(8)) for _ in range(n)]

    async def attempt(token: str) -> bool:
        try:
            await verifier.authenticate(token, time.time())
        except Unauthenticated:
            return False
        return True

    before = server.requests["keys"]
    started = time.perf_counter()
    accepted = sum(await asyncio.gather(*(attempt(t) for t in tokens)))
    elapsed = time.perf_counter() - started
    return server.requests["keys"] - before, accepted, elapsed


def storm(n: int = 1000) -> tuple[int, int, float]:
    """Return (JWKS fetches, tokens accepted, seconds) for n random-kid tokens, cold cache."""
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as tmp:
        dev = pki.init(Path(tmp) / "pki")
        files = dev.files("idp")
        with idp_http.IdpServer(
            state_dir=Path(tmp) / "idp", tls_cert=files.cert, tls_key=files.key
        ) as server:
            getter = HttpsGetter(ca_bundle=dev.ca, timeout=5)
            return asyncio.run(_storm(server, getter, n))


def main(seconds: float) -> None:
    """Measure and print a Markdown table."""
    rows = throughput(seconds)
    fetches, accepted, elapsed = storm()
    floor = rows[0][1]
    print(
        f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · Python {platform.python_version()}"
    )
    print(
        f"{os.cpu_count()} cores on the machine; one process, one thread, {seconds:.0f} s a row\n"
    )
    print("| layer | verifications/s (one core) | vs bare RSA |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / floor:.2f}x |")
    print(
        f"\nUnknown-kid storm: 1,000 concurrent tokens with random kids, cold cache: "
        f"{fetches} JWKS fetches, {accepted} accepted, {elapsed * 1000:.0f} ms in all"
    )


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
