"""The zones are real: the stack split across Linux network namespaces, one per zone.

Topology (N is a random second octet, checked against the root namespace's
addresses and routes so that parallel runs and local networks do not clash):

    agents ns            edge ns                     root ns (CORE)            audit ns
    10.N.1.2  <-veth->  10.N.1.1 | 10.N.2.2  <-veth->  10.N.2.1 | 10.N.3.1  <-veth->  10.N.3.2
    (agent)             issuer, proxy               verifier, policy,         audit
                        on 0.0.0.0                  Redis on 10.N.2.1;
                                                    dev IdP on 127.0.0.1;
                                                    PostgreSQL (Unix socket)

The root namespace, where pytest runs, plays the core zone and drives the
test, so it must reach every service: it has one extra route, 10.N.1.0/24 via
the edge, to reach the address the issuer and proxy are advertised at
(10.N.1.1, the one agents dial). No namespace has a default route and none
forwards (ip_forward is 0 in a new namespace), so agents reach only the edge's
addresses and the edge only the core's; audit is reached from the core only.
The proxy in the edge still reaches the demo PostgreSQL: Unix sockets are
named in the file system, which network namespaces do not divide.

What an agent or the edge can reach is probed from inside its namespace, by
this module run as a script under `ip netns exec`: the agent's grant request
and its TCP probes run in one process, so a probe that fails there fails
because of the zone, not because the probe could not reach anything at all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from jitgate.common import tls
from jitgate.devstack.stack import Placement, Stack
from jitgate.v1 import audit_pb2, audit_pb2_grpc, issuer_pb2, issuer_pb2_grpc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "orders-replica"
AGENT = "deploy-bot"
PROBE_TIMEOUT = 1.0
BLOCKED = {"timeout", "ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH"}
"""How a connection the zones forbid may fail: refused, unreachable, or no answer in time."""


# In the namespaces: this module run as a script ----------------------------


def _tcp(host: str, port: int) -> str:
    """Connect and close: "connected", "timeout" or the errno's name."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return "connected"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def _act_as_agent(issuer: str, ca: str, token: str) -> dict[str, Any]:
    """RequestGrant and ListGrants at the issuer, then one query through the granted proxy."""
    credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
    # The issuer's certificate names "issuer", not the edge address an agent dials.
    options = [("grpc.ssl_target_name_override", "issuer")]
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.secure_channel(issuer, credentials, options=options) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)
        grant = stub.RequestGrant(
            issuer_pb2.RequestGrantRequest(connection=CONNECTION, ttl_seconds=120, reason="zones"),
            timeout=10,
            metadata=metadata,
        )
        listed = stub.ListGrants(issuer_pb2.ListGrantsRequest(), timeout=10, metadata=metadata)
    host, _, port = grant.proxy_endpoint.rpartition(":")
    # hostaddr is dialled; host is what the proxy's certificate is checked against.
    with psycopg.connect(
        host="proxy",
        hostaddr=host,
        port=int(port),
        sslmode="verify-full",
        sslrootcert=ca,
        dbname=grant.connection,
        user=AGENT,
        password=grant.token,
        connect_timeout=5,
        autocommit=True,
    ) as conn:
        row = conn.execute("SELECT current_database(), count(*) FROM orders").fetchone()
    assert row is not None
    return {
        "grant_id": grant.grant_id,
        "subject": grant.subject,
        "connection": grant.connection,
        "proxy_endpoint": grant.proxy_endpoint,
        "listed": [g.grant_id for g in listed.grants],
        "query": [row[0], row[1]],
    }


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    """Act as the agent if asked, then probe each (label, host, port) over TCP."""
    out: dict[str, Any] = {}
    if "agent" in request:
        out["agent"] = _act_as_agent(**request["agent"])
    out["tcp"] = {label: _tcp(host, port) for label, host, port in request["tcp"]}
    return out


# The namespaces ------------------------------------------------------------


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def _ip_out(*argv: str) -> str:
    return subprocess.run(
        ["ip", *argv], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@dataclass(frozen=True)
class Zones:
    """Three namespaces and their links; the root namespace is the core zone."""

    suffix: str
    net: int

    @property
    def edge(self) -> str:
        """The edge zone's namespace: issuer and proxy."""
        return f"jg-edge-{self.suffix}"

    @property
    def audit(self) -> str:
        """The audit zone's namespace."""
        return f"jg-audit-{self.suffix}"

    @property
    def agents(self) -> str:
        """Where the agents are: it has a link to the edge and nothing else."""
        return f"jg-agents-{self.suffix}"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """All three, in creation order."""
        return (self.edge, self.audit, self.agents)

    def veth(self, ends: str) -> str:
        """A veth's name: ends is (this side, other side), e.g. "re" is root's end toward edge."""
        return f"jg{self.suffix}{ends}"  # within the kernel's 15 characters

    def ip(self, link: int, host: int) -> str:
        """10.N.link.host: link 1 is agents-edge, 2 edge-core, 3 core-audit."""
        return f"10.{self.net}.{link}.{host}"

    def exec_prefix(self, namespace: str) -> list[str]:
        """argv prefix running a program in namespace (ip execs it: same pid)."""
        return ["ip", "netns", "exec", namespace]

    def build(self) -> None:
        """Make the links, addresses and the root's one route; the namespaces exist."""
        edge, audit, agents = self.namespaces
        for where, end, peer, peer_namespace in (
            ([], "re", "er", edge),
            ([], "ra", "ar", audit),
            (["-n", edge], "ea", "ae", agents),
        ):
            pair = ["type", "veth", "peer", "name", self.veth(peer), "netns", peer_namespace]
            _ip(*where, "link", "add", self.veth(end), *pair)
        ends = [
            (None, "re", self.ip(2, 1)),
            (edge, "er", self.ip(2, 2)),
            (None, "ra", self.ip(3, 1)),
            (audit, "ar", self.ip(3, 2)),
            (edge, "ea", self.ip(1, 1)),
            (agents, "ae", self.ip(1, 2)),
        ]
        for namespace, end, address in ends:
            where = ["-n", namespace] if namespace else []
            _ip(*where, "addr", "add", f"{address}/24", "dev", self.veth(end))
            _ip(*where, "link", "set", self.veth(end), "up")
        for namespace in self.namespaces:
            _ip("-n", namespace, "link", "set", "lo", "up")
        # The test driver dials the issuer and proxy where agents do; the edge does not
        # forward, so this reaches the edge's own address and nothing beyond it.
        _ip("route", "add", f"{self.ip(1, 0)}/24", "via", self.ip(2, 2), "dev", self.veth("re"))

    def leftovers(self) -> list[str]:
        """Our namespaces and root-side links that still exist."""
        names = set(_ip_out("netns", "list").split())
        links = _ip_out("-o", "link", "show")
        found = [n for n in self.namespaces if n in names]
        return found + [v for v in (self.veth("re"), self.veth("ra")) if f" {v}@" in links]

    def tear_down(self) -> None:
        """Remove links and namespaces (each best effort), then check nothing is left."""
        for end in ("re", "ra"):  # deleting one end deletes the pair, and the route
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", self.veth(end))
        for namespace in self.namespaces:  # takes the links inside with it
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", namespace)
        left = self.leftovers()
        assert not left, f"left behind: {left}"


def _free_net() -> int:
    """A second octet N such that nothing in the root namespace uses 10.N.0.0/16."""
    used = _ip_out("-4", "-o", "addr", "show") + _ip_out("-4", "route", "show", "table", "all")
    for _ in range(50):
        net = 100 + secrets.randbelow(150)
        if f"10.{net}." not in used:
            return net
    raise RuntimeError("no free 10.N.0.0/16 for the test's links")


@pytest.fixture(scope="module")
def zones() -> Iterator[Zones]:
    """The namespaces and links, removed afterwards however the tests end."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("network namespaces need root on Linux")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) to make network namespaces with")
    made = Zones(suffix=secrets.token_hex(3), net=_free_net())
    try:
        _ip("netns", "add", made.edge)
    except RuntimeError as exc:
        made.tear_down()
        pytest.skip(f"cannot make a network namespace: {exc}")
    try:
        _ip("netns", "add", made.audit)
        _ip("netns", "add", made.agents)
        made.build()
        yield made
    finally:
        made.tear_down()


@pytest.fixture(scope="module")
def zoned(zones: Zones, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, each service in its zone's namespace; stopped before they go."""
    core = zones.ip(2, 1)
    edge = Placement(
        host=zones.ip(1, 1),
        listen="0.0.0.0",  # noqa: S104  # both of the edge's links, in its own namespace
        prefix=zones.exec_prefix(zones.edge),
    )
    placements = {
        "issuer": edge,
        "proxy": edge,
        "verifier": Placement(host=core),
        "policy": Placement(host=core),
        "redis": Placement(host=core),
        "audit": Placement(host=zones.ip(3, 2), prefix=zones.exec_prefix(zones.audit)),
    }
    running = Stack(tmp_path_factory.mktemp("zoned"), placements=placements)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _in_namespace(namespace: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run _probe(request) in namespace; the request (a token too) goes on stdin."""
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "tests.e2e.test_zones_netns"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _target(stack: Stack, name: str) -> list[Any]:
    host, _, port = stack.address(name).rpartition(":")
    return [name, host, int(port)]


@pytest.fixture(scope="module")
def from_agents(zones: Zones, zoned: Stack) -> dict[str, Any]:
    """What an agent in its namespace got: a grant and a query, and its TCP probes."""
    names = ("issuer", "proxy", "verifier", "policy", "audit", "redis", "idp")
    request = {
        "agent": {
            "issuer": zoned.address("issuer"),
            "ca": str(zoned.pki.ca),
            "token": zoned.token(AGENT),  # from the IdP in the core, where pytest runs
        },
        "tcp": [_target(zoned, name) for name in names],
    }
    return _in_namespace(zones.agents, request)


def test_agents_get_a_grant_and_reach_the_proxy(zoned: Stack, from_agents: dict[str, Any]) -> None:
    agent = from_agents["agent"]
    assert (agent["subject"], agent["connection"]) == (AGENT, CONNECTION)
    assert agent["grant_id"] in agent["listed"]
    assert agent["proxy_endpoint"] == zoned.address("proxy")
    assert from_agents["tcp"]["issuer"] == "connected"
    assert from_agents["tcp"]["proxy"] == "connected"
    # Through the edge's proxy to the core's PostgreSQL, over its Unix socket.
    assert agent["query"][0] == "orders"
    assert agent["query"][1] >= 1
    # The decision crossed from the core into the audit zone.
    credentials = tls.channel_credentials(zoned.pki.files("auditor"))
    options = [("grpc.ssl_target_name_override", "audit")]
    with grpc.secure_channel(zoned.address("audit"), credentials, options=options) as channel:
        records = list(audit_pb2_grpc.AuditStub(channel).Read(audit_pb2.ReadRequest(), timeout=5))
    assert agent["grant_id"] in {r.event.decision.grant_id for r in records}


def test_agents_reach_nothing_beyond_the_edge(from_agents: dict[str, Any]) -> None:
    # The same process in the same namespace was granted above: the network works there.
    assert from_agents["agent"]["grant_id"]
    tcp = from_agents["tcp"]
    assert tcp["issuer"] == "connected"
    blocked = {name: tcp[name] for name in ("verifier", "policy", "audit", "redis", "idp")}
    assert set(blocked.values()) <= BLOCKED, blocked


def test_the_edge_reaches_the_core_but_not_audit(zones: Zones, zoned: Stack) -> None:
    names = ("verifier", "policy", "redis", "audit")
    tcp = _in_namespace(zones.edge, {"tcp": [_target(zoned, name) for name in names]})["tcp"]
    assert (tcp["verifier"], tcp["policy"], tcp["redis"]) == ("connected",) * 3, tcp
    assert tcp["audit"] in BLOCKED, tcp


if __name__ == "__main__":
    print(json.dumps(_probe(json.load(sys.stdin))))
