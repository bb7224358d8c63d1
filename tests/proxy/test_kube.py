"""The Kubernetes front end's pure parts: request rules, headers that cross, Status bodies."""

from __future__ import annotations

import json

import pytest

from jitgate.proxy import kubehttp, kubepolicy

SCOPE = kubepolicy.Scope(namespace="payments")
EXEC = kubepolicy.Scope(namespace="payments", allow_exec=True)
FORWARD = kubepolicy.Scope(namespace="payments", allow_port_forward=True)
NS = "/api/v1/namespaces/payments"

# (method, path, scope, None if allowed else a phrase of the refusal)
RULES = [
    # Discovery, read only.
    ("GET", "/version", SCOPE, None),
    ("GET", "/api", SCOPE, None),
    ("GET", "/apis", SCOPE, None),
    ("GET", "/api/v1", SCOPE, None),
    ("GET", "/apis/apps", SCOPE, None),
    ("GET", "/apis/apps/v1", SCOPE, None),
    ("GET", "/apis/rbac.authorization.k8s.io/v1", SCOPE, None),
    ("GET", "/openapi/v2", SCOPE, None),
    ("GET", "/openapi/v3", SCOPE, None),
    ("GET", "/openapi/v3/api/v1", SCOPE, None),
    ("HEAD", "/version", SCOPE, None),
    ("POST", "/api/v1", SCOPE, "read only"),
    ("DELETE", "/apis/apps/v1", SCOPE, "read only"),
    # The granted namespace: the object itself read only, everything in it.
    ("GET", NS, SCOPE, None),
    ("DELETE", NS, SCOPE, "changing the namespace payments itself"),
    ("PATCH", NS, SCOPE, "changing the namespace"),
    ("GET", f"{NS}/status", SCOPE, None),
    ("PUT", f"{NS}/status", SCOPE, "changing the namespace"),
    ("PUT", f"{NS}/finalize", SCOPE, "changing the namespace"),
    ("GET", f"{NS}/pods", SCOPE, None),
    ("POST", f"{NS}/pods", SCOPE, None),
    ("GET", f"{NS}/pods/api-0", SCOPE, None),
    ("DELETE", f"{NS}/pods/api-0", SCOPE, None),
    ("GET", f"{NS}/pods/api-0/log", SCOPE, None),
    ("PATCH", "/apis/apps/v1/namespaces/payments/deployments/api", SCOPE, None),
    ("GET", "/apis/apps/v1/namespaces/payments/deployments/api/scale", SCOPE, None),
    ("GET", f"{NS}/secrets", SCOPE, None),
    ("GET", f"{NS}/roles.rbac", SCOPE, None),
    # Other namespaces.
    ("GET", "/api/v1/namespaces/default/pods", SCOPE, "namespace default is not allowed"),
    ("GET", "/api/v1/namespaces/kube-system", SCOPE, "namespace kube-system"),
    ("GET", "/apis/apps/v1/namespaces/payments2/deployments", SCOPE, "namespace payments2"),
    ("GET", "/api/v1/namespaces/PAYMENTS/pods", SCOPE, "namespace PAYMENTS"),
    # Cluster-scoped resources.
    ("GET", "/api/v1/namespaces", SCOPE, "listing namespaces"),
    ("POST", "/api/v1/namespaces", SCOPE, "listing namespaces"),
    ("GET", "/api/v1/nodes", SCOPE, "cluster-scoped"),
    ("GET", "/api/v1/pods", SCOPE, "cluster-scoped"),
    ("GET", "/api/v1/persistentvolumes", SCOPE, "cluster-scoped"),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", SCOPE, "cluster-scoped"),
    ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", SCOPE, "cluster-scoped"),
    ("GET", "/apis/apps/v1/deployments", SCOPE, "cluster-scoped"),
    ("GET", "/api/v1/watch/namespaces/payments/pods", SCOPE, "cluster-scoped"),
    ("GET", "/apis/Apps/v1/namespaces/payments/pods", SCOPE, "cluster-scoped"),
    ("GET", "/logs/", SCOPE, "ambiguous"),
    ("GET", "/metrics", SCOPE, "cluster-scoped"),
    ("GET", "/healthz", SCOPE, "cluster-scoped"),
    # Subresources that reach into pods or their network.
    ("POST", f"{NS}/pods/api-0/exec", SCOPE, "exec into pods"),
    ("GET", f"{NS}/pods/api-0/exec", SCOPE, "exec into pods"),
    ("POST", f"{NS}/pods/api-0/attach", SCOPE, "attach into pods"),
    ("POST", f"{NS}/pods/api-0/exec", EXEC, None),
    ("POST", f"{NS}/pods/api-0/attach", EXEC, None),
    ("POST", f"{NS}/pods/api-0/portforward", SCOPE, "pods/portforward"),
    ("POST", f"{NS}/pods/api-0/portforward", EXEC, "pods/portforward"),
    ("POST", f"{NS}/pods/api-0/portforward", FORWARD, None),
    ("GET", f"{NS}/pods/api-0/proxy", SCOPE, "pods/proxy"),
    ("GET", f"{NS}/pods/api-0:8080/proxy/metrics", SCOPE, "pods/proxy"),
    ("GET", f"{NS}/services/web/proxy/", SCOPE, "ambiguous"),
    ("GET", f"{NS}/services/web/proxy/x", SCOPE, "services/proxy"),
    ("GET", f"{NS}/services/web/proxy/x", FORWARD, None),
    ("POST", f"{NS}/pods/api-0/exec", FORWARD, "exec into pods"),
    # An ephemeral container runs a command in the pod: exec by another name.
    ("PATCH", f"{NS}/pods/api-0/ephemeralcontainers", SCOPE, "ephemeral containers"),
    ("PUT", f"{NS}/pods/api-0/ephemeralcontainers", FORWARD, "ephemeral containers"),
    ("GET", f"{NS}/pods/api-0/ephemeralcontainers", SCOPE, "ephemeral containers"),
    ("PATCH", f"{NS}/pods/api-0/ephemeralcontainers", EXEC, None),
    # A TokenRequest mints a credential that outlives the grant: never, any scope.
    ("POST", f"{NS}/serviceaccounts/default/token", SCOPE, "not minted through jitgate"),
    ("POST", f"{NS}/serviceaccounts/deployer/token", EXEC, "not minted through jitgate"),
    ("POST", f"{NS}/serviceaccounts/deployer/token", FORWARD, "not minted through jitgate"),
    ("GET", f"{NS}/serviceaccounts/deployer/token", SCOPE, "not minted through jitgate"),
    ("GET", f"{NS}/serviceaccounts/deployer", SCOPE, None),
    # Paths two parsers could read differently are refused, not normalised.
    ("GET", f"{NS}/../../nodes", SCOPE, "ambiguous"),
    ("GET", f"{NS}/./pods", SCOPE, "ambiguous"),
    ("GET", f"{NS}//pods", SCOPE, "ambiguous"),
    ("GET", "//api/v1/nodes", SCOPE, "ambiguous"),
    ("GET", f"{NS}/pods/", SCOPE, "ambiguous"),
    # Methods the API does not use.
    ("TRACE", f"{NS}/pods", SCOPE, "method TRACE"),
    ("CONNECT", f"{NS}/pods", SCOPE, "method CONNECT"),
    ("OPTIONS", "/version", SCOPE, "method OPTIONS"),
]


@pytest.mark.parametrize(("method", "path", "scope", "refused"), RULES)
def test_the_request_rules(
    method: str, path: str, scope: kubepolicy.Scope, refused: str | None
) -> None:
    why = kubepolicy.refusal(method, path, [("accept", "application/json")], scope)
    if refused is None:
        assert why is None
    else:
        assert why is not None
        assert refused in why


@pytest.mark.parametrize(
    "header",
    [
        "Impersonate-User",
        "impersonate-group",
        "IMPERSONATE-UID",
        "Impersonate-Extra-Scopes",
        "Impersonate-Extra-acme.com%2Fproject",
    ],
)
def test_any_impersonation_header_is_refused(header: str) -> None:
    why = kubepolicy.refusal("GET", f"{NS}/pods", [(header, "admin")], SCOPE)
    assert why is not None
    assert "impersonation" in why
    # Even on discovery: the agent acts as the ServiceAccount or not at all.
    assert kubepolicy.refusal("GET", "/api", [(header, "admin")], SCOPE) is not None


@pytest.mark.parametrize(
    "target",
    [
        f"{NS}%2F..%2Fkube-system/pods",
        f"{NS}/pods%2Fapi-0",
        f"{NS}/%2e%2e/pods",
        f"{NS}/pods/api\x00",
        f"{NS}/pods/ápi",
        f"{NS}/pods/api 0",
        f"{NS}/pods\\api",
        f"{NS}/pods?watch=1\x00",
        f"{NS}/pods?labelSelector=app=\u00e9",
        f"{NS}/pods#frag",
        "api/v1",
        "*",
        "https://elsewhere/api",
        "/" + "a" * kubepolicy.MAX_TARGET,
    ],
)
def test_ambiguous_targets_are_refused(target: str) -> None:
    assert kubepolicy.split_target(target) is None


def test_a_plain_target_splits_into_path_and_query() -> None:
    assert kubepolicy.split_target(f"{NS}/pods?watch=1&labelSelector=app%3Dweb") == (
        f"{NS}/pods",
        "watch=1&labelSelector=app%3Dweb",
    )
    assert kubepolicy.split_target("/version") == ("/version", "")


def test_a_status_is_what_the_api_server_would_send() -> None:
    body = kubehttp.status(403, "namespace kube-system is not allowed")
    assert json.loads(body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "jitgate: namespace kube-system is not allowed",
        "reason": "Forbidden",
        "code": 403,
    }
    headers = dict(kubehttp.status_headers(403, body))
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert b"www-authenticate" not in headers
    assert json.loads(kubehttp.status(401, "x"))["reason"] == "Unauthorized"
    assert dict(kubehttp.status_headers(401, b""))[b"www-authenticate"].startswith(b"Bearer")
    assert json.loads(kubehttp.status(503, "x"))["reason"] == "ServiceUnavailable"
    # Too many requests in flight on one grant: client-go backs off on a 429's Retry-After.
    assert json.loads(kubehttp.status(429, "x"))["reason"] == "TooManyRequests"
    assert dict(kubehttp.status_headers(429, b""))[b"retry-after"] == b"1"
    assert json.loads(kubehttp.status(408, "x"))["reason"] == "Timeout"


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"authorization", b"Bearer abc.def")], "abc.def"),
        ([(b"authorization", b"bearer  abc")], "abc"),
        ([(b"Authorization", b"BEARER abc")], "abc"),
        ([], None),
        ([(b"authorization", b"Basic YWxhZGRpbjpvcGVuc2VzYW1l")], None),
        ([(b"authorization", b"Bearer")], None),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], None),
        ([(b"authorization", "Bearer é".encode())], None),
    ],
)
def test_the_bearer_token(headers: list[tuple[bytes, bytes]], token: str | None) -> None:
    assert kubehttp.bearer(headers) == token


AGENT_HEADERS = [
    (b"host", b"proxy:6443"),
    (b"authorization", b"Bearer GRANT-TOKEN"),
    (b"accept", b"application/json"),
    (b"user-agent", b"kubectl/v1.32"),
    (b"connection", b"keep-alive, x-secret-hop"),
    (b"keep-alive", b"timeout=5"),
    (b"x-secret-hop", b"1"),
    (b"te", b"trailers"),
    (b"trailer", b"x-t"),
    (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
    (b"proxy-connection", b"keep-alive"),
    (b"impersonate-user", b"admin"),
    (b"x-remote-user", b"admin"),
    (b"x-remote-group", b"system:masters"),
    (b"expect", b"100-continue"),
    (b"content-type", b"application/json"),
    (b"content-length", b"2"),
]


def test_the_api_server_gets_our_credential_our_host_and_no_hop_headers() -> None:
    out = kubehttp.upstream_request_headers(
        AGENT_HEADERS, host=b"api.example:6443", token="SA-TOKEN", upgrade=False
    )
    assert out == [
        (b"host", b"api.example:6443"),
        (b"accept", b"application/json"),
        (b"user-agent", b"kubectl/v1.32"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer SA-TOKEN"),
        (b"content-length", b"2"),
    ]
    assert b"GRANT-TOKEN" not in b"".join(v for _, v in out)


def test_a_chunked_body_stays_chunked_and_an_upgrade_is_kept() -> None:
    chunked = kubehttp.upstream_request_headers(
        [(b"transfer-encoding", b"chunked")], host=b"h", token="t", upgrade=False
    )
    assert (b"transfer-encoding", b"chunked") in chunked
    upgrade = [
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-protocol", b"v5.channel.k8s.io"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
    ]
    assert kubehttp.is_upgrade(upgrade)
    assert not kubehttp.is_upgrade([(b"upgrade", b"websocket")])
    assert not kubehttp.is_upgrade([(b"connection", b"upgrade")])
    out = kubehttp.upstream_request_headers(upgrade, host=b"h", token="t", upgrade=True)
    assert out[-2:] == [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    assert (b"sec-websocket-protocol", b"v5.channel.k8s.io") in out
    # The proxy re-cuts the server's frames: no extension may be in use (RFC 6455 §5.4).
    assert not [n for n, _ in out if n == b"sec-websocket-extensions"]
    # No legitimate upgrade: the Upgrade header does not cross.
    plain = kubehttp.upstream_request_headers(upgrade, host=b"h", token="t", upgrade=False)
    assert not [n for n, _ in plain if n in (b"upgrade", b"connection")]


def test_the_agent_gets_the_response_headers_minus_hops_and_our_credential() -> None:
    headers, dropped = kubehttp.agent_response_headers(
        [
            (b"content-type", b"application/json"),
            (b"content-length", b"10"),
            (b"connection", b"close, x-hop"),
            (b"x-hop", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"audit-id", b"abc"),
            (b"x-echo", b"Bearer SA-TOKEN"),
        ],
        secret="SA-TOKEN",
    )
    assert headers == [
        (b"content-type", b"application/json"),
        (b"content-length", b"10"),
        (b"audit-id", b"abc"),
    ]
    assert dropped == [b"x-echo"]
    chunked, _ = kubehttp.agent_response_headers(
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"10")], secret="s"
    )
    assert chunked == []  # RFC 9112 §6.3: the length means nothing then
    switched, _ = kubehttp.agent_response_headers(
        [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-accept", b"x")],
        secret="s",
        switching=True,
    )
    assert switched == [
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"x"),
        (b"connection", b"Upgrade"),
    ]
