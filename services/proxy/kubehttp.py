"""HTTP pieces of the Kubernetes front end: Status bodies and the headers that may cross."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    408: "Timeout",
    429: "TooManyRequests",
    502: "InternalError",
    503: "ServiceUnavailable",
}
# RFC 9110 §7.6.1: these describe one hop, never the message; a proxy drops
# them (and any header the Connection header names) before forwarding.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


def status(code: int, message: str) -> bytes:
    """A Kubernetes `Status` object (meta/v1) saying why, as the API server would send it."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"jitgate: {message}",
        "reason": REASONS.get(code, "InternalError"),
        "code": code,
    }
    return json.dumps(body).encode()


def status_headers(code: int, body: bytes) -> Headers:
    """Headers for a Status response of ours."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if code == 401:
        # RFC 9110 §11.6.1: a 401 names the scheme the client should use.
        headers.append((b"www-authenticate", b'Bearer realm="jitgate"'))
    if code == 429:
        # RFC 6585 §4 and RFC 9110 §10.2.3: when to try again, in seconds.
        headers.append((b"retry-after", b"1"))
    return headers


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names the Connection header lists (RFC 9110 §7.6.1), lowercased."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return named


def is_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the request asks to switch protocols (RFC 9110 §7.8): exec, attach, port-forward."""
    return b"upgrade" in _connection_tokens(headers) and any(
        name.lower() == b"upgrade" for name, _ in headers
    )


def bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The one Bearer token of the Authorization header (RFC 6750 §2.1), else None."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    # RFC 9110 §11.1: the scheme is case-insensitive.
    if scheme.lower() != b"bearer" or not token or not token.isascii():
        return None
    return token.decode("ascii")


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]], *, host: bytes, token: str, upgrade: bool
) -> Headers:
    """The agent's headers as the API server gets them: our credential, our Host, one hop.

    Dropped: hop-by-hop headers and those Connection names (RFC 9110
    §7.6.1), the agent's Authorization (the grant token stays with us),
    Impersonate-* (refused before this anyway), the front-proxy identity
    headers X-Remote-* (an API server trusting them must never take them
    from an agent), Expect (RFC 9110 §10.1.1: we forward whole bodies and do
    not relay 100 Continue), Sec-WebSocket-Extensions (RFC 6455 §5.4: the
    proxy re-cuts frames, which it may do only with no extension in use).
    Framing is set again for the body we send.
    """
    named = _connection_tokens(headers)
    out: Headers = [(b"host", host)]
    length: bytes | None = None
    chunked = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            length = value
            continue
        if lower == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        if (
            lower in HOP_BY_HOP
            or lower in named
            or lower in (b"host", b"authorization", b"expect", b"sec-websocket-extensions")
            or lower.startswith((b"impersonate-", b"x-remote-"))
        ):
            continue
        out.append((lower, value))
    out.append((b"authorization", b"Bearer " + token.encode()))
    # The body is framed as the agent framed it (h11 has checked that framing).
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    elif length is not None:
        out.append((b"content-length", length))
    if upgrade:
        # The one hop-by-hop exchange we relay: RFC 9110 §7.8, the upstream
        # answers 101 and both sides speak SPDY or WebSocket from there.
        out += [(b"connection", b"Upgrade")]
        out += [(b"upgrade", v) for n, v in headers if n.lower() == b"upgrade"]
    return out


def agent_response_headers(
    headers: Sequence[tuple[bytes, bytes]], *, secret: str, switching: bool = False
) -> tuple[Headers, list[bytes]]:
    """The API server's response headers as the agent gets them; also the names dropped.

    The response is the API server's, but each hop's framing is ours (RFC
    9110 §7.6.1); Content-Length is kept, so a sized body stays sized. A
    header that carries the upstream credential is dropped (and named for
    the log, never its value): it must not reach the agent by any route.
    """
    named = _connection_tokens(headers)
    out: Headers = []
    dropped: list[bytes] = []
    needle = secret.encode()
    # RFC 9112 §6.3: with Transfer-Encoding, a Content-Length means nothing.
    encoded = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    for name, value in headers:
        lower = name.lower()
        if switching and lower == b"upgrade":
            out.append((lower, value))
            continue
        if lower == b"content-length":
            if not encoded:
                out.append((lower, value))
            continue
        if lower in HOP_BY_HOP or lower in named:
            continue
        if needle and needle in value:
            dropped.append(lower)
            continue
        out.append((lower, value))
    if switching:
        out.append((b"connection", b"Upgrade"))
    return out, dropped


def upgrades_to_websocket(headers: Headers) -> bool:
    """Whether a 101's headers switch to WebSocket (RFC 6455 §4.2.2)."""
    return any(
        name == b"upgrade" and value.strip().lower() == b"websocket" for name, value in headers
    )
