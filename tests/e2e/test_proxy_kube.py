"""The Kubernetes proxy in the real stack, driven by the real kubectl, against a test API server.

There is no real Kubernetes API server here: the upstream is tests/kubeapi.py,
a test API server that answers in Kubernetes' formats and records what it
receives. Everything else is real: the stack's processes, `jitgate grant
request` and `jitgate grant kubeconfig` as the agent runs them, and kubectl.
"""

from __future__ import annotations

import http.client
import json
import queue
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jitgate import client as sdk
from jitgate.devstack import pki
from jitgate.devstack.stack import Stack
from tests.e2e import kube_rig
from tests.e2e.conftest import audit_records, operator_revokes
from tests.e2e.kube_rig import CONNECTION, NAMESPACE, jitgate
from tests.kubeapi import KubeApi

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kubeapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApi]:
    """The test API server, with a certificate from a CA of its own and a ServiceAccount token."""
    root = tmp_path_factory.mktemp("kubeapi-pki")
    pki.init(root, names=())
    server = KubeApi(pki.issue(root, "kubeapi"), f"sa-test-{secrets.token_urlsafe(24)}").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kubeapi: KubeApi) -> Iterator[Stack]:
    """The whole stack, its proxy serving payments-staging from the test API server."""
    with kube_rig.serving(tmp_path_factory, kubeapi) as running:
        yield running


class Agent(kube_rig.Agent):
    """An agent's machine: its jitgate home, its kubeconfig, its kubectl."""

    def __init__(self, stack: Stack, home: Path, ttl: int = 120) -> None:
        super().__init__(stack, home, ttl)
        # The grant names its namespace; the kubeconfig's context defaults to it.
        assert self.grant["namespace"] == NAMESPACE

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run kubectl with this agent's kubeconfig."""
        return subprocess.run(
            ["kubectl", "--request-timeout=10s", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start kubectl with this agent's kubeconfig, its output piped."""
        return subprocess.Popen(
            ["kubectl", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def agent(stack: Stack, tmp_path: Path) -> Iterator[Agent]:
    """deploy-bot with a fresh payments-staging grant and its kubeconfig; revoked afterwards."""
    mine = Agent(stack, tmp_path)
    yield mine
    issuer = sdk.IssuerClient(
        stack.address("issuer"), token=stack.token("deploy-bot"), ca_file=stack.pki.ca
    )
    with issuer:
        if mine.grant["grant_id"] in {g.grant_id for g in issuer.list_grants()}:
            issuer.revoke_grant(mine.grant["grant_id"], reason="test over")


def _raw(
    stack: Stack, path: str, token: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request to the proxy with a plain HTTP client: status, headers, body."""
    context = ssl.create_default_context(cafile=str(stack.pki.ca))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", stack.ports["proxy-kube"], context=context, timeout=10
    )
    try:
        conn.request(
            "GET",
            f"/connections/{CONNECTION}{path}",
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        )
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_kubectl_lists_and_gets_pods_from_the_test_api_server(
    agent: Agent, kubeapi: KubeApi
) -> None:
    before = len(kubeapi.seen)
    listed = agent.kubectl("get", "pods", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["pod/api-0", "pod/api-1"]
    got = agent.kubectl("get", "pod", "api-1", "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["metadata"]["name"] == "api-1"
    namespace = agent.kubectl("get", "namespace", NAMESPACE, "-o", "name")
    assert namespace.returncode == 0, namespace.stderr
    assert namespace.stdout.strip() == f"namespace/{NAMESPACE}"
    seen = kubeapi.seen[before:]
    assert f"/api/v1/namespaces/{NAMESPACE}/pods" in [s.path for s in seen]
    assert f"/api/v1/namespaces/{NAMESPACE}/pods/api-1" in [s.path for s in seen]
    # The test API server got the ServiceAccount token, never the grant, on every request.
    assert {s.headers.get("authorization") for s in seen} == {f"Bearer {kubeapi.token}"}
    assert not any(agent.grant["token"] in json.dumps(s.headers) for s in seen)


def test_kubectl_watches_pods_through_the_test_api_server(agent: Agent, kubeapi: KubeApi) -> None:
    assert kubeapi.wait_watches(0, 5.0)
    watch = agent.popen("get", "pods", "-w", "-o", "name")
    try:
        assert watch.stdout is not None
        lines = [watch.stdout.readline().strip() for _ in range(3)]
        assert kubeapi.watches_open == 1
    finally:
        watch.kill()
        watch.wait()
    # The list, then the ADDED event the test API server streams.
    assert lines == ["pod/api-0", "pod/api-1", "pod/watched-0"]
    # The agent left: the proxy closes the upstream watch too, grant or no grant.
    assert kubeapi.wait_watches(0, 2.0)
    watches = [s for s in kubeapi.seen if s.query.get("watch") in (["1"], ["true"])]
    assert watches
    assert watches[-1].path == f"/api/v1/namespaces/{NAMESPACE}/pods"


REFUSED = {
    "another namespace": (("get", "pods", "-n", "kube-system"), "namespace kube-system"),
    "a cluster-scoped resource": (("get", "nodes"), "cluster-scoped resources"),
    "the namespace list": (("get", "namespaces"), "listing namespaces"),
    "impersonation": (("get", "pods", "--as", "admin"), "impersonation"),
    "impersonating a group": (
        ("get", "pods", "--as", "admin", "--as-group", "system:masters"),
        "impersonation",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_kubectl_is_refused_with_a_403_status_and_the_test_api_server_sees_nothing(
    agent: Agent, kubeapi: KubeApi, case: str
) -> None:
    args, message = REFUSED[case]
    # Discovery first, as any session starts: with --as, a cold discovery is
    # refused too, and kubectl prints "Forbidden: unknown" for a refused discovery.
    assert agent.kubectl("get", "pods", "-o", "name").returncode == 0
    before = len(kubeapi.seen)
    refused = agent.kubectl(*args)
    assert refused.returncode != 0
    assert "Error from server (Forbidden): jitgate:" in refused.stderr
    assert message in refused.stderr
    seen = kubeapi.seen[before:]
    # Discovery at most: the refused request itself never reached it.
    assert {s.path for s in seen} <= {"/version", "/api", "/apis", "/api/v1", "/apis/apps/v1"}
    assert not any(k.startswith("impersonate-") for s in seen for k in s.headers)


def test_kubectl_create_token_is_refused_whatever_rbac_allows(
    agent: Agent, kubeapi: KubeApi
) -> None:
    # A TokenRequest would mint a cluster credential that outlives the grant.
    before = len(kubeapi.seen)
    refused = agent.kubectl("create", "token", "default")
    assert refused.returncode != 0
    assert "jitgate: ServiceAccount tokens" in refused.stderr
    assert "are not minted through jitgate" in refused.stderr
    assert not [s for s in kubeapi.seen[before:] if s.path.endswith("/token")]


@pytest.mark.parametrize(
    ("path", "headers", "message"),
    [
        ("/api/v1/nodes", {}, "cluster-scoped resources are not allowed; only namespace payments"),
        ("/api/v1/namespaces/default/pods", {}, "namespace default is not allowed"),
        (f"/api/v1/namespaces/{NAMESPACE}/pods", {"Impersonate-User": "admin"}, "impersonation"),
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles", {}, "cluster-scoped"),
        (f"/api/v1/namespaces/{NAMESPACE}%2F..%2Fkube-system/pods", {}, "ambiguous"),
        (
            f"/api/v1/namespaces/{NAMESPACE}/pods/api-0/ephemeralcontainers",
            {},
            "ephemeral containers in pods are not allowed",
        ),
    ],
)
def test_the_refusal_is_a_kubernetes_status_object(
    stack: Stack, agent: Agent, path: str, headers: dict[str, str], message: str
) -> None:
    code, reply_headers, body = _raw(stack, path, agent.grant["token"], headers)
    assert code == 403
    assert reply_headers["content-type"] == "application/json"
    status = json.loads(body)
    assert {k: v for k, v in status.items() if k != "message"} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
    }
    assert status["message"].startswith("jitgate: ")
    assert message in status["message"]


def test_a_missing_or_bad_token_gets_a_401_status(stack: Stack) -> None:
    for token in ("", "not-a-grant"):
        code, headers, body = _raw(stack, "/api/v1/namespaces/payments/pods", token)
        assert code == 401
        assert json.loads(body)["reason"] == "Unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")


def test_the_service_account_token_never_reaches_the_agent(
    stack: Stack, agent: Agent, kubeapi: KubeApi
) -> None:
    before = len(kubeapi.seen)
    verbose = agent.kubectl("get", "pods", "-v=9")
    assert verbose.returncode == 0, verbose.stderr
    received = [verbose.stdout, verbose.stderr, agent.kubeconfig.read_text()]
    assert "Response Body" in verbose.stderr  # -v=9 shows what came back
    for path in ("/version", "/api", "/apis", f"/api/v1/namespaces/{NAMESPACE}/pods", "/nope"):
        _, headers, body = _raw(stack, path, agent.grant["token"])
        received += [json.dumps(headers), body.decode(errors="replace")]
    assert not [text for text in received if kubeapi.token in text]
    # ...while the test API server did receive it, and the proxy logged it nowhere.
    assert all(
        s.headers["authorization"] == f"Bearer {kubeapi.token}" for s in kubeapi.seen[before:]
    )
    assert kubeapi.token.encode() not in (stack.logs / "proxy.log").read_bytes()
    assert agent.grant["token"].encode() not in (stack.logs / "proxy.log").read_bytes()


WATCH = ("get", "pods", "-w", "--output-watch-events", "-o", "json")
"""kubectl prints each event, ERROR events included: the agent sees why a watch ended."""


def _until(lines: queue.Queue[str], text: str, timeout: float = 15.0) -> list[str]:
    """The lines up to the first that contains text (or to the end of the output)."""
    got = []
    while True:
        line = lines.get(timeout=timeout)
        got.append(line)
        if text in line or line == "":
            return got


def _lines(pipe: Any) -> queue.Queue[str]:
    """A queue the lines of pipe arrive in, read by a thread (readline has no timeout)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in pipe:
            lines.put(line.strip())
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_the_operator_revoking_cuts_a_watch_within_a_second(
    stack: Stack, agent: Agent, kubeapi: KubeApi
) -> None:
    assert kubeapi.wait_watches(0, 5.0)
    watch = agent.popen(*WATCH)
    try:
        lines = _lines(watch.stdout)
        assert "watched-0" in _until(lines, "watched-0")[-1]  # the watch is streaming
        operator_revokes(stack, agent.grant["grant_id"], "incident 7")
        revoked = time.monotonic()
        assert kubeapi.wait_watches(0, 2.0)
        upstream_cut = time.monotonic() - revoked
        last = _until(lines, "ERROR")
        watch.wait(timeout=10)
        agent_cut = time.monotonic() - revoked
    finally:
        watch.kill()
        watch.wait()
    assert upstream_cut < 1.0
    assert agent_cut < 1.0
    ended = json.loads(last[-1])
    assert ended["type"] == "ERROR"
    assert ended["object"]["message"] == "jitgate: the grant has been revoked"
    assert ended["object"]["code"] == 401
    # From then on the grant gets a 401, however recently it was redeemed.
    after = agent.kubectl("get", "pods")
    assert after.returncode != 0
    assert "Unauthorized" in after.stderr or "logged in" in after.stderr
    code, _, body = _raw(stack, f"/api/v1/namespaces/{NAMESPACE}/pods", agent.grant["token"])
    assert code == 401
    assert json.loads(body)["reason"] == "Unauthorized"
    # The redemption and the session's end are on the audit record.
    for _ in range(50):
        records = audit_records(stack)
        closed = [
            r.event.session_closed
            for r in records
            if r.event.session_closed.grant_id == agent.grant["grant_id"]
        ]
        if closed:
            break
        time.sleep(0.05)
    redeemed = [r.event.redemption for r in records if r.event.redemption.grant_id]
    mine = [r for r in redeemed if r.grant_id == agent.grant["grant_id"]]
    assert len(mine) == 1  # once, however many requests
    assert [(c.session_id, c.reason) for c in closed] == [(mine[0].session_id, "revoked")]
    assert closed[0].bytes_to_client > 0


def test_a_watch_is_cut_when_the_grant_expires(stack: Stack, tmp_path: Path) -> None:
    short = Agent(stack, tmp_path, ttl=4)
    watch = short.popen(*WATCH)
    try:
        lines = _lines(watch.stdout)
        assert "watched-0" in _until(lines, "watched-0")[-1]
        last = _until(lines, "ERROR")
        ended = time.time()
        watch.wait(timeout=10)
    finally:
        watch.kill()
        watch.wait()
    assert abs(ended - datetime.fromisoformat(short.grant["expires_at"]).timestamp()) < 1.0
    assert json.loads(last[-1])["object"]["message"] == "jitgate: the grant has expired"
    code, _, _ = _raw(stack, f"/api/v1/namespaces/{NAMESPACE}/pods", short.grant["token"])
    assert code == 401
    # Past the expiry (the proxy cuts at its whole second, up to 1 s early), the
    # expired grant is gone from the agent's store too.
    time.sleep(
        max(0.0, datetime.fromisoformat(short.grant["expires_at"]).timestamp() - time.time())
    )
    written = jitgate(stack, tmp_path, "grant", "kubeconfig", short.grant["grant_id"])
    assert written.returncode == 6
    assert "no live grant" in written.stderr


def test_a_grant_of_another_kind_is_not_stored_and_gets_no_kubeconfig(
    stack: Stack, tmp_path: Path
) -> None:
    requested = jitgate(stack, tmp_path, "grant", "request", "orders-replica", "--json")
    assert requested.returncode == 0, requested.stderr
    grant_id = json.loads(requested.stdout)["grant_id"]
    assert not list(tmp_path.glob("grants/*"))  # its token was printed, never written to disk
    written = jitgate(stack, tmp_path, "grant", "kubeconfig", grant_id)
    assert written.returncode == 6
    assert "only kubernetes grants are kept" in written.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("exec", "api-0", "--", "echo", "x"), "exec into pods is not allowed on this connection"),
        (("attach", "api-0"), "attach into pods is not allowed on this connection"),
        (("port-forward", "pod/api-0", "0:80"), "pods/portforward is not allowed"),
    ],
)
def test_exec_attach_and_port_forward_are_refused_without_the_connections_leave(
    agent: Agent, kubeapi: KubeApi, args: tuple[str, ...], message: str
) -> None:
    before = len(kubeapi.seen)
    refused = agent.kubectl(*args)
    assert refused.returncode != 0
    assert message in refused.stderr
    assert not [
        s for s in kubeapi.seen[before:] if s.path.endswith(("/exec", "/attach", "/portforward"))
    ]
