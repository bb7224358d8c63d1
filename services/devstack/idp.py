"""A development OIDC issuer shaped like an Okta custom authorization server.

It stands in for Okta on a laptop: HTTPS on loopback, a discovery document, a
JWKS, and a client-credentials token endpoint that mints Okta-shaped RS256
access tokens for the test agents in a TOML file. The verifier reaches it only
through its public URL, exactly as it would reach Okta. Never for production.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import secrets
import socket
import socketserver
import ssl
import string
import threading
import tomllib
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from jitgate.common.clock import Clock, system_clock
from jitgate.common.errors import ConfigError
from jitgate.common.keys import b64url

log = logging.getLogger(__name__)

AUDIENCE = "api://default"
"""The audience of Okta's default custom authorization server."""
ISSUER_PATH = "/oauth2/default"
DEFAULT_SCOPES = ("jitgate",)
CLAIMS = ("ver", "jti", "iss", "aud", "iat", "exp", "cid", "uid", "scp", "sub", "groups")
"""The claims of an access token, as Okta's custom authorization servers issue them."""
DEFAULT_TOKEN_LIFETIME = 3600
KEY_FILE = "idp-signing-key.pem"
MAX_BODY_BYTES = 8 * 1024
"""A client-credentials request is a few hundred bytes."""
_AGENT_KEYS = frozenset({"secret", "subject", "groups", "scopes", "uid"})
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
_UID_ALPHABET = string.digits + string.ascii_letters


def example_agents() -> Path:
    """Return the path of the bundled example agents file."""
    resource = importlib.resources.files("jitgate.devstack") / "examples" / "agents.toml"
    return Path(str(resource))


@dataclass(frozen=True, kw_only=True)
class Agent:
    """A test agent: an OAuth client with its own identity and groups."""

    client_id: str
    secret: str = field(repr=False)
    subject: str
    uid: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def okta_uid(client_id: str) -> str:
    """Return a stable Okta-like user id ("00u" + 17 characters) for client_id."""
    digest = hashlib.sha256(f"jitgate-dev-idp uid {client_id}".encode()).digest()
    return "00u" + "".join(_UID_ALPHABET[b % len(_UID_ALPHABET)] for b in digest[:17])


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def parse_agents(document: Mapping[str, Any], source: str = "agents") -> dict[str, Agent]:
    """Return the agents in a parsed agents file; unknown keys are errors naming their path."""
    for key in document:
        if key != "agents":
            raise ConfigError(f"{source}: unknown key {key!r}; only [agents.NAME] tables go here")
    table = document.get("agents", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: agents must be a table of [agents.NAME]")
    agents: dict[str, Agent] = {}
    for name, spec in table.items():
        where = f"{source}: agents.{name}"
        if not set(name) <= _NAME_CHARS:
            raise ConfigError(f"{where}: agent names use letters, digits, '.', '_' and '-'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table")
        for key in spec:
            if key not in _AGENT_KEYS:
                raise ConfigError(
                    f"{where}.{key} is not a known key; use one of {', '.join(sorted(_AGENT_KEYS))}"
                )
        if "secret" not in spec:
            raise ConfigError(f"{where}.secret is required")
        agents[name] = Agent(
            client_id=name,
            secret=_text(spec["secret"], f"{where}.secret"),
            subject=_text(spec.get("subject", name), f"{where}.subject"),
            uid=_text(spec.get("uid", okta_uid(name)), f"{where}.uid"),
            groups=_strings(spec.get("groups", []), f"{where}.groups"),
            scopes=_strings(spec.get("scopes", list(DEFAULT_SCOPES)), f"{where}.scopes"),
        )
    return agents


def load_agents(path: Path | None = None) -> dict[str, Agent]:
    """Return the agents in path (default: the bundled example file)."""
    path = path or example_agents()
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read agents file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_agents(document, str(path))


def rsa_jwk(public: rsa.RSAPublicKey) -> dict[str, str]:
    """Return the public JWK members of an RSA key (RFC 7518, section 6.3.1)."""
    numbers = public.public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "n": b64url(n), "e": b64url(e)}


def rsa_key_id(public: rsa.RSAPublicKey) -> str:
    """Return the RFC 7638 thumbprint of an RSA public key: a kid that survives restarts."""
    members = json.dumps(rsa_jwk(public), sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(members.encode()).digest())


def load_or_create_key(state_dir: Path) -> rsa.RSAPrivateKey:
    """Return the signing key kept in state_dir, creating an RSA-2048 key the first time."""
    path = state_dir / KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a readable PEM private key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise ConfigError(f"{path} must hold an RSA key of at least 2048 bits")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def mint(
    claims: Mapping[str, Any],
    *,
    key: rsa.RSAPrivateKey | bytes | None,
    alg: str = "RS256",
    kid: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Return a compact JWS over claims, signed however a test asks, good or hostile.

    key is an RSA key for RS*/PS*, raw bytes for HS* (e.g. an RSA public key's
    PEM, for the key-confusion attack), and None for "none" in any spelling.
    headers are added after alg and kid, so a test can override either.
    """
    header: dict[str, Any] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    header.update(headers or {})
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    ).encode()
    family, size = alg[:2].upper(), alg[2:]
    if alg.lower() == "none":
        signature = b""
    elif family == "HS" and isinstance(key, bytes) and size in _HASHES:
        signature = hmac.new(key, signing_input, f"sha{size}").digest()
    elif family in ("RS", "PS") and isinstance(key, rsa.RSAPrivateKey) and size in _HASHES:
        digest = _HASHES[size]()
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if family == "RS"
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        signature = key.sign(signing_input, pad, digest)
    else:
        raise ValueError(f"cannot sign alg {alg!r} with {type(key).__name__}")
    return f"{signing_input.decode()}.{b64url(signature)}"


@dataclass(frozen=True, kw_only=True)
class Idp:
    """The issuer itself: documents, keys and tokens, without the HTTP around them."""

    issuer: str
    key: rsa.RSAPrivateKey = field(repr=False)
    agents: Mapping[str, Agent]
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME
    audience: str = AUDIENCE
    kid: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kid", rsa_key_id(self.key.public_key()))

    def discovery(self) -> dict[str, Any]:
        """Return the OpenID Provider metadata (OpenID Connect Discovery 1.0, section 3)."""
        scopes = sorted({s for agent in self.agents.values() for s in agent.scopes})
        return {
            "issuer": self.issuer,
            "token_endpoint": f"{self.issuer}/v1/token",
            "jwks_uri": f"{self.issuer}/v1/keys",
            "response_types_supported": ["none"],
            "grant_types_supported": ["client_credentials"],
            "subject_types_supported": ["public"],
            "scopes_supported": scopes,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "claims_supported": list(CLAIMS),
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        """Return the JSON Web Key Set with the public half of the signing key."""
        jwk = {**rsa_jwk(self.key.public_key()), "kid": self.kid, "alg": "RS256", "use": "sig"}
        return {"keys": [jwk]}

    def claims(self, agent: Agent, *, now: float, scopes: tuple[str, ...]) -> dict[str, Any]:
        """Return the claims of an access token for agent, shaped like Okta's."""
        issued = int(now)
        return {
            "ver": 1,
            "jti": "AT." + secrets.token_urlsafe(32),
            "iss": self.issuer,
            "aud": self.audience,
            "iat": issued,
            "exp": issued + self.token_lifetime,
            "cid": agent.client_id,
            "uid": agent.uid,
            "scp": list(scopes),
            "sub": agent.subject,
            "groups": list(agent.groups),
        }

    def access_token(
        self, agent: Agent | str, *, now: float, scopes: tuple[str, ...] | None = None
    ) -> str:
        """Return a signed access token for agent (an Agent or a client id) issued at now."""
        if isinstance(agent, str):
            agent = self.agents[agent]
        granted = agent.scopes if scopes is None else scopes
        claims = self.claims(agent, now=now, scopes=granted)
        return mint(claims, key=self.key, kid=self.kid)

    def mint(self, claims: Mapping[str, Any], **kw: Any) -> str:
        """Return mint(claims) signed with this issuer's key and kid unless kw says otherwise."""
        kw.setdefault("key", self.key)
        kw.setdefault("kid", self.kid)
        return mint(claims, **kw)

    def authenticate(self, client_id: str, secret: str) -> Agent | None:
        """Return the agent whose credentials these are, comparing in constant time."""
        agent = self.agents.get(client_id)
        # Compare against a throwaway secret for unknown clients too, so the
        # response time does not tell which client ids exist.
        expected = agent.secret if agent is not None else secrets.token_urlsafe(32)
        same = hmac.compare_digest(expected.encode(), secret.encode())
        return agent if agent is not None and same else None


class _OAuthError(Exception):
    """An RFC 6749, section 5.2 error response; internal to the HTTP handler."""

    def __init__(self, status: HTTPStatus, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description


def _client_credentials(authorization: str | None, form: Mapping[str, str]) -> tuple[str, str]:
    """Return (client id, secret) from a token request's Basic header or form body."""
    in_body = "client_id" in form or "client_secret" in form
    if authorization is not None:
        if in_body:
            # RFC 6749, section 2.3: a client MUST NOT use more than one method.
            raise _OAuthError(
                HTTPStatus.BAD_REQUEST, "invalid_request", "use one client authentication method"
            )
        scheme, _, encoded = authorization.partition(" ")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except ValueError:
            decoded = ""
        client_id, colon, secret = decoded.partition(":")
        if scheme.lower() != "basic" or not colon:
            raise _OAuthError(
                HTTPStatus.UNAUTHORIZED, "invalid_client", "malformed Basic credentials"
            )
        # RFC 6749, section 2.3.1: both halves are form-urlencoded before Base64.
        return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)
    if not in_body:
        raise _OAuthError(
            HTTPStatus.UNAUTHORIZED, "invalid_client", "client authentication required"
        )
    return form.get("client_id", ""), form.get("client_secret", "")


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=16,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise _OAuthError(HTTPStatus.BAD_REQUEST, "invalid_request", "malformed form body") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            # RFC 6749, section 3.2: request parameters MUST NOT be repeated.
            raise _OAuthError(HTTPStatus.BAD_REQUEST, "invalid_request", f"{name} repeated")
        form[name] = value
    return form


class _Handler(BaseHTTPRequestHandler):
    server: IdpHttpServer
    timeout = 10.0
    server_version = "jitgate-dev-idp"
    sys_version = ""
    # Errors http.server answers itself (a bad request line, an unknown method)
    # are JSON too, and echo nothing the client sent.
    error_content_type = "application/json"
    error_message_format = '{"error": "http_%(code)d"}'

    def setup(self) -> None:
        # The TLS handshake runs here, in the request's own thread, so a client
        # that stalls mid-handshake cannot block the accept loop.
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Send the access log to logging at debug level; no line carries a token."""
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # RFC 6749, section 5.1: token responses must not be cached.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Pragma", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> str | None:
        path = urllib.parse.urlsplit(self.path).path
        prefix = self.server.issuer_path
        routes = {
            f"{prefix}/.well-known/openid-configuration": "discovery",
            f"{prefix}/v1/keys": "keys",
            f"{prefix}/v1/token": "token",
        }
        return routes.get(path)

    def _not_allowed(self, allow: str) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method_not_allowed"}, {"Allow": allow})

    def do_GET(self) -> None:
        """Serve the discovery document and the JWKS."""
        route = self._route()
        self.server.count(route or "unknown")
        if route == "discovery":
            self._send(HTTPStatus.OK, self.server.idp.discovery())
        elif route == "keys":
            self._send(HTTPStatus.OK, self.server.idp.jwks())
        elif route == "token":
            self._not_allowed("POST")
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    def _other(self) -> None:
        route = self._route()
        self.server.count(route or "unknown")
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
        else:
            self._not_allowed("POST" if route == "token" else "GET")

    do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _other

    def do_POST(self) -> None:
        """Serve the token endpoint."""
        route = self._route()
        self.server.count(route or "unknown")
        if route in ("discovery", "keys"):
            self._not_allowed("GET")
            return
        if route != "token":
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
            return
        try:
            self._send(HTTPStatus.OK, self._token())
        except _OAuthError as exc:
            log.info("token request refused: %s", exc)
            headers = {}
            if exc.status == HTTPStatus.UNAUTHORIZED:
                headers["WWW-Authenticate"] = f'Basic realm="{self.server.idp.issuer}"'
            body = {"error": exc.error, "error_description": exc.description}
            self._send(exc.status, body, headers)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _OAuthError(
                HTTPStatus.LENGTH_REQUIRED, "invalid_request", "Content-Length needed"
            )
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise _OAuthError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "invalid_request", "request body too large"
            )
        return self.rfile.read(int(length))

    def _token(self) -> dict[str, Any]:
        body = self._body()
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise _OAuthError(
                HTTPStatus.BAD_REQUEST, "invalid_request", "use application/x-www-form-urlencoded"
            )
        form = _form(body)
        client_id, secret = _client_credentials(self.headers.get("Authorization"), form)
        idp = self.server.idp
        agent = idp.authenticate(client_id, secret)
        if agent is None:
            raise _OAuthError(
                HTTPStatus.UNAUTHORIZED, "invalid_client", "client authentication failed"
            )
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _OAuthError(HTTPStatus.BAD_REQUEST, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise _OAuthError(
                HTTPStatus.BAD_REQUEST,
                "unsupported_grant_type",
                f"{grant_type[:64]!r} not supported",
            )
        requested = tuple(form.get("scope", "").split())
        unknown = [s for s in requested if s not in agent.scopes]
        if unknown:
            raise _OAuthError(
                HTTPStatus.BAD_REQUEST, "invalid_scope", "scope not allowed for this client"
            )
        scopes = requested or agent.scopes
        token = idp.access_token(agent, now=self.server.clock(), scopes=scopes)
        log.info("issued a token to %s, scopes %s", agent.client_id, " ".join(scopes))
        return {
            "token_type": "Bearer",
            "expires_in": idp.token_lifetime,
            "access_token": token,
            "scope": " ".join(scopes),
        }


class IdpHttpServer(ThreadingHTTPServer):
    """The HTTPS server around an Idp; counts requests per route for tests."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], *, context: ssl.SSLContext, make_idp: Any, clock: Clock
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )
        self.clock = clock
        self.issuer_path = ISSUER_PATH
        self.idp: Idp = make_idp(self.server_address[1])
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def count(self, route: str) -> None:
        """Count one request to route."""
        with self._lock:
            self.requests[route] += 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed connection (often a client that did not trust us) without a traceback."""
        log.debug("connection from %s failed", client_address, exc_info=True)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class IdpServer:
    """The dev IdP serving HTTPS on loopback in a background thread."""

    def __init__(
        self,
        *,
        state_dir: Path,
        tls_cert: Path,
        tls_key: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        agents: Mapping[str, Agent] | None = None,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        clock: Clock = system_clock,
    ) -> None:
        if not _loopback(host):
            raise ConfigError(f"the dev IdP listens on loopback only, not {host!r}")
        if not 60 <= token_lifetime <= 86400:
            raise ConfigError("token lifetime must be 60 to 86400 seconds")
        key = load_or_create_key(state_dir)
        known = dict(agents if agents is not None else load_agents())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {tls_cert} / {tls_key}: {exc}") from exc
        url_host = f"[{host}]" if ":" in host else host

        def make_idp(bound_port: int) -> Idp:
            issuer = f"https://{url_host}:{bound_port}{ISSUER_PATH}"
            return Idp(issuer=issuer, key=key, agents=known, token_lifetime=token_lifetime)

        try:
            self._http = IdpHttpServer(
                (host, port), context=context, make_idp=make_idp, clock=clock
            )
        except OSError as exc:
            raise ConfigError(f"the dev IdP cannot listen on {host}:{port}: {exc}") from exc
        self._thread: threading.Thread | None = None

    @property
    def idp(self) -> Idp:
        """The issuer behind this server."""
        return self._http.idp

    @property
    def issuer(self) -> str:
        """The issuer URL, e.g. https://127.0.0.1:PORT/oauth2/default."""
        return self.idp.issuer

    @property
    def requests(self) -> Counter[str]:
        """Requests served so far, by route ("discovery", "keys", "token", "unknown")."""
        return self._http.requests

    def start(self) -> IdpServer:
        """Start serving in a background thread; return self."""
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.1,), name="dev-idp", daemon=True
        )
        self._thread.start()
        log.info("dev IdP serving %s", self.issuer)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self._http.server_close()

    def __enter__(self) -> IdpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
