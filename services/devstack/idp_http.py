"""The dev OIDC issuer's HTTPS front: discovery, JWKS and the token endpoint on loopback."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import socketserver
import ssl
import threading
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jitgate.common.clock import Clock, system_clock
from jitgate.common.errors import ConfigError
from jitgate.devstack.idp import (
    DEFAULT_TOKEN_LIFETIME,
    ISSUER_PATH,
    MAX_BODY_BYTES,
    Agent,
    Idp,
    load_agents,
    load_or_create_key,
)

log = logging.getLogger(__name__)


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
