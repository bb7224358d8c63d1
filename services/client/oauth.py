"""OAuth 2.0 client credentials (RFC 6749, section 4.4): how an agent gets its access token."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any

from jitgate.common.errors import ConfigError, Unauthenticated, Unavailable

MAX_RESPONSE_BYTES = 64 * 1024
"""A token response is a few kilobytes; anything larger is not one."""


def _form_encode(value: str) -> str:
    # RFC 6749, section 2.3.1: client_secret_basic encodes id and secret with
    # application/x-www-form-urlencoded before Base64, so a ':' in either survives.
    return urllib.parse.quote_plus(value, safe="")


def _context(ca_file: Path | str | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA bundle {ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _read(response: http.client.HTTPResponse, deadline: float) -> bytes:
    body = b""
    while len(body) <= MAX_RESPONSE_BYTES:
        if time.monotonic() > deadline:
            raise Unavailable("idp", "token response too slow")
        chunk = response.read1(16 * 1024)
        if not chunk:
            return body
        body += chunk
    raise Unavailable("idp", f"token response larger than {MAX_RESPONSE_BYTES} bytes")


def client_credentials_token(
    token_url: str,
    client_id: str,
    client_secret: str,
    *,
    ca_file: Path | str | None,
    scope: str | None = None,
    timeout: float = 5.0,
) -> str:
    """Return an access token for this client from token_url, authenticating with HTTP Basic.

    ca_file None trusts the system's CAs (a real Okta tenant); the dev IdP needs
    the dev CA. A refusal by the server (bad credentials, scope not allowed) is
    Unauthenticated naming the OAuth error; a server that cannot be reached or
    answers nonsense is Unavailable. Redirects are never followed: the client
    secret goes to the configured URL and nowhere else.
    """
    try:
        url = urllib.parse.urlsplit(token_url)
        port = url.port or 443
    except ValueError:
        url, port = urllib.parse.urlsplit(""), 0
    if url.scheme != "https" or not url.hostname or url.username or url.password or not port:
        raise ConfigError(f"token URL {token_url!r} must be https://host/... without credentials")
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    body = urllib.parse.urlencode(form).encode()
    basic = base64.b64encode(
        f"{_form_encode(client_id)}:{_form_encode(client_secret)}".encode()
    ).decode("ascii")
    headers = {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    path = url.path or "/"
    if url.query:
        path += f"?{url.query}"
    deadline = time.monotonic() + timeout
    connection = http.client.HTTPSConnection(
        url.hostname, port, context=_context(ca_file), timeout=timeout
    )
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        payload = _read(response, deadline)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        raise Unavailable("idp", f"POST {token_url}: {exc}") from exc
    finally:
        connection.close()
    return _token_from(status, payload, token_url)


def _token_from(status: int, payload: bytes, token_url: str) -> str:
    try:
        document: Any = json.loads(payload)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise Unavailable("idp", f"{token_url} answered {status} without a JSON object")
    if status == 200:
        token = document.get("access_token")
        if not isinstance(token, str) or not token:
            raise Unavailable("idp", f"{token_url} answered 200 without an access_token")
        if str(document.get("token_type", "")).lower() != "bearer":
            raise Unavailable("idp", f"{token_url} issued a {document.get('token_type')!r} token")
        return token
    error = document.get("error")
    if 400 <= status < 500 and isinstance(error, str):
        # RFC 6749, section 5.2: the server refused this client or request.
        description = document.get("error_description")
        detail = f"{error}: {description}" if isinstance(description, str) else error
        raise Unauthenticated("oauth", detail[:200])
    raise Unavailable("idp", f"{token_url} answered {status}")
