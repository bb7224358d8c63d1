"""Which Kubernetes API requests a one-namespace grant may make: a pure function, no I/O.

The proxy forwards a request only if `refusal` returns None; otherwise the
agent gets a 403 Status with the returned reason. The rules are an
allow-list: discovery (read only), the granted namespace object (read only)
and everything under the granted namespace's paths, minus the subresources
the connection does not allow and ServiceAccount token requests, never allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_TARGET = 4096
"""Bytes of a request target; longer ones are refused, not truncated (RFC 9112 §3 lets us)."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
"""What the API server's verbs map to; CONNECT, TRACE, OPTIONS and others are refused."""
# RFC 3986 §3.3 pchar without "%": an API path never needs percent-encoding
# (object names are DNS names or similar), and a decoded "/" or "." would make
# the API server see another path than the one checked here. Refusing beats
# normalising: two parsers can never disagree about a path neither decodes.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]+")
# The query is the API server's business (selectors, watch, dry-run), but it
# must be printable ASCII: no NUL, no bytes another parser might split on.
_QUERY_CHARS = re.compile(r"[\x21-\x7e]*")
_SEGMENT = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
"""An API group or version (DNS subdomain-like)."""
EXEC = frozenset({"exec", "attach"})
FORWARD = frozenset({"portforward", "proxy"})
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
"""`/api/v1/namespaces/<ns>/status|finalize` are the (cluster-scoped) Namespace object's own."""


@dataclass(frozen=True, kw_only=True)
class Scope:
    """What one connection reaches: a namespace, and whether exec or port-forward are allowed."""

    namespace: str
    allow_exec: bool = False
    allow_port_forward: bool = False


def split_target(target: str) -> tuple[str, str] | None:
    """Return (path, query) of an origin-form target, or None if it is ambiguous or too long."""
    if len(target) > MAX_TARGET or not target.startswith("/"):
        return None
    path, _, query = target.partition("?")
    if not _PATH_CHARS.fullmatch(path) or not _QUERY_CHARS.fullmatch(query) or "#" in target:
        return None
    return path, query


def _segments(path: str) -> list[str] | None:
    """The path's segments, or None if one is empty, "." or ".."."""
    parts = path[1:].split("/")
    # "//" and "."/".." segments are resolved differently by different parsers
    # (RFC 3986 §5.2.4 removes dot segments, Go's mux cleans paths): refused.
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def _discovery(parts: list[str]) -> bool:
    """Whether the path is a discovery endpoint (read only for everyone)."""
    if parts in (["version"], ["api"], ["apis"], ["api", "v1"], ["openapi", "v2"]):
        return True
    if parts[:2] == ["openapi", "v3"]:
        return True
    return (
        parts[0] == "apis"
        and 2 <= len(parts) <= 3
        and all(_SEGMENT.fullmatch(p) for p in parts[1:])
    )


def _subresource(rest: list[str], scope: Scope) -> str | None:
    """The refusal for a path below namespaces/<ns>/ (rest: resource, name, subresource, …)."""
    if len(rest) >= 3 and rest[0] == "serviceaccounts" and rest[2] == "token":
        # A TokenRequest mints a credential of the cluster's own, one that
        # outlives the grant and works without the proxy: never, whatever RBAC says.
        return (
            "ServiceAccount tokens (serviceaccounts/<name>/token) are not minted through"
            " jitgate: a credential must not outlive the grant"
        )
    if len(rest) >= 3 and rest[2] in EXEC and rest[0] == "pods" and not scope.allow_exec:
        return f"{rest[2]} into pods is not allowed on this connection"
    # An ephemeral container runs a command of the agent's choice inside the
    # pod: exec by another name, allowed exactly when exec is.
    ephemeral = len(rest) >= 3 and rest[2] == "ephemeralcontainers" and rest[0] == "pods"
    if ephemeral and not scope.allow_exec:
        return "ephemeral containers in pods are not allowed on this connection (as exec)"
    # portforward reaches any port of a pod, and the proxy subresources (pods,
    # services, …/proxy) relay HTTP to any port too: both open a path into the
    # namespace's network that the API's own verbs do not, so both are
    # allowed only with allow_port_forward.
    if len(rest) >= 3 and rest[2] in FORWARD and not scope.allow_port_forward:
        return f"{rest[0]}/{rest[2]} is not allowed on this connection"
    return None


def refusal(method: str, path: str, headers: Iterable[tuple[str, str]], scope: Scope) -> str | None:
    """Why this request is refused (a sentence for the agent), or None if it may be forwarded.

    path is the request's path below the connection prefix, checked by
    split_target; header names are compared case-insensitively (RFC 9110 §5.1).
    """
    for name, _ in headers:
        # Impersonation would make the ServiceAccount act as someone else:
        # the grant is for this account's reach in one namespace, no more.
        if name.lower().startswith("impersonate-"):
            return "impersonation (Impersonate-* headers) is not allowed"
    if method not in METHODS:
        return f"the method {method[:16]} is not allowed"
    parts = _segments(path)
    if parts is None:
        return "ambiguous paths (empty, '.' or '..' segments) are refused"
    if _discovery(parts):
        return None if method in ("GET", "HEAD") else "discovery endpoints are read only"
    if parts[:3] == ["api", "v1", "namespaces"]:
        rest = parts[3:]
    elif (
        len(parts) >= 4
        and parts[0] == "apis"
        and parts[3] == "namespaces"
        and all(_SEGMENT.fullmatch(p) for p in parts[1:3])
    ):
        rest = parts[4:]
    else:
        return "cluster-scoped resources are not allowed; only namespace " + scope.namespace
    if not rest:
        return "listing namespaces is not allowed; only namespace " + scope.namespace
    if rest[0] != scope.namespace:
        return f"namespace {rest[0][:63]} is not allowed; only namespace {scope.namespace}"
    rest = rest[1:]
    if not rest or (len(rest) == 1 and rest[0] in NAMESPACE_SUBRESOURCES):
        # The Namespace object is cluster-scoped: the agent may read its own, no more.
        if method in ("GET", "HEAD"):
            return None
        return f"changing the namespace {scope.namespace} itself is not allowed"
    return _subresource(rest, scope)
