"""Interop check: jitgate against panva's oidc-provider, an OpenID Certified provider.

Starts oidc-provider (interop/oidc-provider, Node.js) over HTTPS on loopback and
the whole jitgate stack with its verifier trusting that provider instead of the
dev IdP, then shows that:

- an access token the provider issues with the client_credentials grant (an RFC
  9068 JWT: RS256, typ at+jwt, a `groups` claim) gets a grant through the
  issuer, and is denied a connection its group has no binding for;
- hostile variants of it (alg none, HS256 keyed with the public key, another
  key under the provider's kid, a changed payload, a token for another
  resource, an expired token, garbage) all get UNAUTHENTICATED with one and the
  same message and no status details, and the audit log holds the verifier's
  reason for each.

Prints a report and exits 0 only if every expectation held. Needs node and npm;
runs `npm ci` first if interop/oidc-provider/node_modules is missing.

    .venv/bin/python interop/run.py      (or: make interop)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import status_pb2

from jitgate.client import Denied, GrantError, IssuerClient, Unauthenticated
from jitgate.client.oauth import client_credentials_token
from jitgate.common import tls
from jitgate.common.logs import fingerprint
from jitgate.devstack import children, pki
from jitgate.devstack.stack import Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, issuer_pb2, issuer_pb2_grpc

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc-provider"
AUDIENCE = "api://jitgate"
"""The resource (and so the `aud`) of the provider's tokens for jitgate."""
SHORT_LIVED = "urn:jitgate:interop:short-lived"
"""A resource whose tokens also have aud AUDIENCE but live 2 seconds."""
OTHER_API = "api://another-api"
"""A resource the provider knows that is not jitgate."""
CLIENT_ID = "interop-agent"
GROUP = "platform"
"""examples/policy.toml binds it to orders-replica (and payments-staging)."""
ALLOWED, NOT_BOUND = "orders-replica", "billing-primary"
LEEWAY = 5
"""The verifier's clock-skew leeway here (default 30 s), so the expired token needs no long wait."""
START_TIMEOUT = 30.0


class CheckFailed(Exception):
    """The run could not get as far as the checks."""


@dataclass
class Result:
    """One expectation and whether it held."""

    name: str
    ok: bool
    detail: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return json.loads(_unb64(header)), json.loads(_unb64(payload))


# The provider -------------------------------------------------------------


def _npm_ci() -> None:
    if (PROVIDER_DIR / "node_modules").is_dir():
        return
    print("npm ci in interop/oidc-provider (node_modules is missing) ...", flush=True)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PROVIDER_DIR, check=True
    )


def _provider_version() -> str:
    package = PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json"
    return str(json.loads(package.read_text())["version"])


@contextlib.contextmanager
def provider(
    files: tls.TlsFiles, secret: str, log: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run oidc-provider on a free loopback port; yield its issuer URL and its process."""
    argv = [
        "node",
        "server.mjs",
        "--cert",
        str(files.cert),
        "--key",
        str(files.key),
        "--client-id",
        CLIENT_ID,
        "--groups",
        GROUP,
        "--audience",
        AUDIENCE,
    ]
    with log.open("ab") as err:
        process = subprocess.Popen(
            children.binary_argv(argv),
            cwd=PROVIDER_DIR,
            env={**os.environ, "OIDC_CLIENT_SECRET": secret},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("https://"):
            tail = log.read_text(errors="replace")[-2000:]
            raise CheckFailed(f"oidc-provider did not start (no issuer URL printed):\n{tail}")
        yield line, process
    finally:
        children.stop(process)
        if process.stdout is not None:
            process.stdout.close()


def _https(
    url: str, ca: Path, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str]
) -> tuple[int, Any]:
    """One HTTPS exchange with verified TLS and no redirects; the status and the JSON body."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise CheckFailed(f"not an https URL: {url}")
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=context, timeout=5
    )
    try:
        connection.request(method, parts.path or "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def discovery(issuer: str, ca: Path) -> dict[str, Any]:
    """The provider's OpenID Connect discovery document."""
    status, document = _https(
        f"{issuer}/.well-known/openid-configuration", ca, headers={"Accept": "application/json"}
    )
    if status != 200 or not isinstance(document, dict):
        raise CheckFailed(f"discovery answered {status}")
    return document


def token_for(token_endpoint: str, ca: Path, secret: str, resource: str) -> str:
    """An access token for one resource (RFC 8707), by client_credentials."""
    basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "resource": resource})
    status, reply = _https(
        token_endpoint,
        ca,
        method="POST",
        body=body.encode(),
        headers={
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        },
    )
    if status != 200 or not isinstance(reply, dict) or "access_token" not in reply:
        raise CheckFailed(f"token request for {resource} answered {status}: {reply}")
    return str(reply["access_token"])


# Hostile variants -----------------------------------------------------------


def alg_none(real: str) -> str:
    """The real claims under alg none, with no signature."""
    header, claims = _decode(real)
    return f"{_json_segment({**header, 'alg': 'none'})}.{_json_segment(claims)}."


def hs256_with_public_key(real: str, public_pem: bytes) -> str:
    """The real claims, HMAC-signed with the provider's public key (PEM) as the secret."""
    header, claims = _decode(real)
    signing_input = f"{_json_segment({**header, 'alg': 'HS256'})}.{_json_segment(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def other_key(real: str) -> str:
    """The real claims and header, signed by a fresh RSA key under the provider's kid."""
    header, claims = _decode(real)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    extra = {k: v for k, v in header.items() if k != "alg"}
    return jwt.encode(claims, attacker, algorithm="RS256", headers=extra)


def changed_payload(real: str) -> str:
    """The real header and signature around claims with more groups added."""
    header, payload, signature = real.split(".")
    claims = json.loads(_unb64(payload))
    claims["groups"] = [*claims.get("groups", []), "billing-oncall", "sre"]
    return f"{header}.{_json_segment(claims)}.{signature}"


def public_pem(jwks_uri: str, ca: Path, kid: str) -> bytes:
    """The provider's public key called kid, as PEM (what a key-confusion attacker would use)."""
    status, document = _https(jwks_uri, ca, headers={"Accept": "application/json"})
    if status != 200 or not isinstance(document, dict):
        raise CheckFailed(f"JWKS answered {status}")
    for jwk in document.get("keys", []):
        if jwk.get("kid") == kid:
            key = jwt.PyJWK(jwk).key
            return bytes(
                key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
    raise CheckFailed(f"kid {kid} is not in the provider's JWKS")


# Against the stack -----------------------------------------------------------


@dataclass
class Outcome:
    """What the issuer answered a RequestGrant."""

    code: grpc.StatusCode
    message: str
    details: int
    """How many google.rpc details the status carried (-1: no status trailer at all)."""


def request_grant(stack: Stack, token: str) -> Outcome:
    """Call RequestGrant for ALLOWED with token, as an agent would, and record the answer."""
    roots = stack.pki.ca.read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    with grpc.secure_channel(stack.address("issuer"), credentials) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)
        try:
            stub.RequestGrant(
                issuer_pb2.RequestGrantRequest(
                    connection=ALLOWED, ttl_seconds=60, reason="interop check"
                ),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=5,
            )
        except grpc.RpcError as exc:
            call: Any = exc
            details = -1
            for key, value in call.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    status = status_pb2.Status()
                    status.ParseFromString(value)
                    details = len(status.details)
            return Outcome(call.code(), call.details() or "", details)
    return Outcome(grpc.StatusCode.OK, "", 0)


def rejection_reasons(stack: Stack) -> dict[str, str]:
    """The audit log's token rejections, read as the auditor: token fingerprint to reason."""
    credentials = tls.channel_credentials(stack.pki.files("auditor"))
    options = [("grpc.ssl_target_name_override", "audit")]
    reasons: dict[str, str] = {}
    with grpc.secure_channel(stack.address("audit"), credentials, options=options) as channel:
        for record in audit_pb2_grpc.AuditStub(channel).Read(
            audit_pb2.ReadRequest(from_index=0), timeout=5
        ):
            if record.event.WhichOneof("kind") == "token_rejected":
                rejected = record.event.token_rejected
                reasons[rejected.token_fingerprint] = rejected.reason
    return reasons


def _checks(stack: Stack, issuer: str, secret: str, short_lived: str) -> list[Result]:
    ca = stack.pki.ca
    metadata = discovery(issuer, ca)
    token_endpoint = str(metadata["token_endpoint"])
    # The agent's own client, as against Okta: client_credentials, HTTP Basic.
    token = client_credentials_token(token_endpoint, CLIENT_ID, secret, ca_file=ca)
    header, claims = _decode(token)
    print(f"token     header {json.dumps(header)}")
    shown = {k: v for k, v in claims.items() if k != "jti"}
    print(f"          claims {json.dumps(shown)} (lifetime {claims['exp'] - claims['iat']} s)")
    results: list[Result] = []

    with IssuerClient(stack.address("issuer"), token=token, ca_file=ca) as agent:
        try:
            grant = agent.request_grant(ALLOWED, ttl_seconds=60, reason="interop check")
            ok = grant.subject == claims["sub"] and grant.connection == ALLOWED
            left = grant.expires_at.timestamp() - time.time()
            detail = f"grant {grant.grant_id} for {grant.connection}, subject {grant.subject!r}"
            results.append(Result("provider's token gets a grant", ok, f"{detail}, {left:.0f} s"))
            agent.revoke_grant(grant.grant_id, reason="interop check done")
        except Unauthenticated as exc:
            # The verifier refused the provider's genuine token: say why.
            reason = rejection_reasons(stack).get(fingerprint(token), "none recorded")
            detail = f"UNAUTHENTICATED {exc}; the verifier's reason: {reason}"
            results.append(Result("provider's token gets a grant", False, detail))
        except GrantError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            results.append(Result("provider's token gets a grant", False, detail))
        try:
            agent.request_grant(NOT_BOUND, reason="interop check")
            results.append(Result(f"{NOT_BOUND} is denied", False, "it was granted"))
        except Denied as denied:
            ok = denied.reason == "NO_BINDING"
            results.append(Result(f"{NOT_BOUND} is denied", ok, f"PERMISSION_DENIED {denied}"))
        except GrantError as exc:
            results.append(Result(f"{NOT_BOUND} is denied", False, f"{type(exc).__name__}: {exc}"))

    kid = str(header["kid"])
    wrong_audience = token_for(token_endpoint, ca, secret, OTHER_API)
    expires = float(_decode(short_lived)[1]["exp"])
    bad_alg, bad_signature = frozenset({"alg_not_allowed"}), frozenset({"signature_invalid"})
    confused = hs256_with_public_key(token, public_pem(str(metadata["jwks_uri"]), ca, kid))
    variants: list[tuple[str, str, frozenset[str]]] = [
        ("alg none", alg_none(token), bad_alg),
        ("HS256 keyed with the public key", confused, bad_alg),
        ("another RSA key, provider's kid", other_key(token), bad_signature),
        ("changed payload (groups added)", changed_payload(token), bad_signature),
        (f"issued for {OTHER_API}", wrong_audience, frozenset({"aud_mismatch"})),
        ("expired (2 s token)", short_lived, frozenset({"expired"})),
        ("garbage string", "not-a-jwt", frozenset({"segment_count", "token_malformed"})),
    ]
    # The expired one must be past exp plus the verifier's leeway.
    wait = expires + LEEWAY + 1 - time.time()
    if wait > 0:
        print(f"          (waiting {wait:.1f} s for the 2-second token to be past its leeway)")
        time.sleep(wait)
    outcomes = [(name, request_grant(stack, t), t, expected) for name, t, expected in variants]
    reasons = rejection_reasons(stack)
    messages = {outcome.message for _, outcome, _, _ in outcomes}
    for name, outcome, hostile, expected in outcomes:
        reason = reasons.get(fingerprint(hostile), "none recorded")
        ok = (
            outcome.code == grpc.StatusCode.UNAUTHENTICATED
            and outcome.details <= 0
            and reason in expected
        )
        detail = (
            f"{outcome.code.name} {outcome.message!r}, "
            f"{'no' if outcome.details <= 0 else outcome.details} details; audit reason: {reason}"
        )
        if reason not in expected:
            detail += f" (expected {' or '.join(sorted(expected))})"
        results.append(Result(f"{name} is rejected", ok, detail))
    one = len(messages) == 1
    shown_messages = ", ".join(repr(m) for m in sorted(messages))
    results.append(
        Result("every rejection reads the same", one, f"{len(outcomes)} answers: {shown_messages}")
    )
    return results


def main() -> int:
    """Run the check; 0 when every expectation held."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            print(f"interop: {tool} is not on PATH; this check needs Node.js 20+ and npm")
            return 2
    _npm_ci()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    print(f"jitgate interop: oidc-provider {_provider_version()} on Node {node.stdout.strip()}")
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="jitgate-interop-") as tmp:
        state = Path(tmp)
        (state / "logs").mkdir()
        dev = pki.init(state / "pki")
        results: list[Result] = []
        failure = ""
        stack: Stack | None = None
        try:
            with provider(dev.files("idp"), secret, state / "logs" / "oidc-provider.log") as (
                issuer,
                _,
            ):
                print(f"provider  {issuer} (HTTPS with the dev CA's idp certificate)")
                endpoint = str(discovery(issuer, dev.ca)["token_endpoint"])
                # Fetched before the stack starts, so it is expired by the time it is used.
                short_lived = token_for(endpoint, dev.ca, secret, SHORT_LIVED)
                stack = Stack(
                    state,
                    oidc_issuer=issuer,
                    oidc_audience=AUDIENCE,
                    oidc_ca_bundle=dev.ca,
                    env={"JITGATE_OIDC_LEEWAY": str(LEEWAY)},
                )
                started = time.monotonic()
                stack.start(timeout=START_TIMEOUT)
                took = time.monotonic() - started
                print(f"stack     all SERVING in {took:.1f} s, no dev IdP; the verifier trusts")
                print(f"          {issuer}, audience {stack.oidc_audience}, leeway {LEEWAY} s")
                results = _checks(stack, issuer, secret, short_lived)
        except (CheckFailed, OSError, subprocess.SubprocessError, grpc.RpcError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            failure = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            if stack is not None:
                stack.stop()
        print()
        for result in results:
            print(f"{'PASS' if result.ok else 'FAIL'}  {result.name}: {result.detail}")
        provider_log = state / "logs" / "oidc-provider.log"
        if provider_log.exists() and "Unsupported runtime" in provider_log.read_text(
            errors="replace"
        ):
            print(
                f"note  oidc-provider {_provider_version()} calls Node {node.stdout.strip()}"
                " an unsupported runtime (it asks for Node 22 LTS or later)"
            )
        failed = [r for r in results if not r.ok]
        if failure or failed:
            if failure:
                print(f"FAIL  the run stopped early: {failure}")
            for name in ("verifier", "oidc-provider"):
                log = state / "logs" / f"{name}.log"
                if log.exists():
                    lines = log.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- last lines of {name}.log ---", *lines, sep="\n")
            held = len(results) - len(failed)
            early = ", and the run stopped early" if failure else ""
            print(f"interop FAILED: {held} of {len(results)} expectations held{early}")
            return 1
        print(f"interop passed: {len(results)} of {len(results)} expectations held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
