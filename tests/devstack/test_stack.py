"""The stack's verifier trusts the dev IdP by default, or another issuer when given one."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitgate.common.errors import ConfigError
from jitgate.devstack.stack import Stack


def test_by_default_the_verifier_trusts_the_dev_idp(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    env = stack._env("verifier")
    assert stack.dev_idp
    assert env["JITGATE_OIDC_ISSUER"] == f"https://127.0.0.1:{stack.ports['idp']}/oauth2/default"
    assert env["JITGATE_OIDC_CA_BUNDLE"] == str(stack.pki.ca)


def test_another_issuer_replaces_the_dev_idp(tmp_path: Path) -> None:
    bundle = tmp_path / "their-ca.pem"
    stack = Stack(
        tmp_path,
        oidc_issuer="https://127.0.0.1:9999",
        oidc_audience="api://jitgate",
        oidc_ca_bundle=bundle,
    )
    env = stack._env("verifier")
    assert not stack.dev_idp
    assert stack.oidc_issuer == "https://127.0.0.1:9999"
    assert env["JITGATE_OIDC_ISSUER"] == "https://127.0.0.1:9999"
    assert env["JITGATE_OIDC_AUDIENCE"] == "api://jitgate"
    assert env["JITGATE_OIDC_CA_BUNDLE"] == str(bundle)
    with pytest.raises(ConfigError):
        stack.token("deploy-bot")


def test_another_issuer_without_a_bundle_uses_the_system_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JITGATE_OIDC_CA_BUNDLE", "/somewhere/else.pem")
    env = Stack(tmp_path, oidc_issuer="https://idp.example")._env("verifier")
    assert "JITGATE_OIDC_CA_BUNDLE" not in env


def test_given_connections_replace_the_demo_postgres(tmp_path: Path) -> None:
    given = tmp_path / "connections.toml"
    stack = Stack(tmp_path / "state", upstreams=given)
    assert stack.proxy_connections == given.resolve()  # what JITGATE_PROXY_CONNECTIONS names
    stack._start_postgres()
    assert stack.postgres is None  # nothing started, nothing written over the given file
    assert not given.exists()


def test_without_connections_the_proxy_serves_the_demo_postgres(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    assert stack.proxy_connections == tmp_path.resolve() / "proxy" / "connections.toml"


def _placed(tmp_path: Path) -> Stack:
    from jitgate.devstack.stack import Placement

    edge = Placement(
        host="10.9.1.1",
        listen="0.0.0.0",  # noqa: S104  # not bound: only passed on
        prefix=("ip", "netns", "exec", "edge"),
    )
    stack = Stack(
        tmp_path,
        redis_url="redis://admin@10.9.2.1:6379/0",
        placements={
            "issuer": edge,
            "proxy": edge,
            "verifier": Placement(host="10.9.2.1"),
            "idp": Placement(host="::1"),
        },
    )
    stack.redis_users = dict.fromkeys(("issuer", "policy", "proxy"), "redis://x@10.9.2.1:6379/0")
    return stack


def test_by_default_every_process_listens_where_it_is_reached(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    for name in ("issuer", "verifier", "policy", "audit", "proxy", "idp"):
        assert stack.address(name) == f"127.0.0.1:{stack.ports[name]}"
        assert stack.listen_address(name) == stack.address(name)
    assert stack._env("audit")["JITGATE_LISTEN"] == stack.address("audit")


def test_a_placed_service_is_reached_at_its_host_and_listens_on_its_own(tmp_path: Path) -> None:
    stack = _placed(tmp_path)
    ports = stack.ports
    assert stack.address("issuer") == f"10.9.1.1:{ports['issuer']}"
    assert stack._env("issuer")["JITGATE_LISTEN"] == f"0.0.0.0:{ports['issuer']}"
    assert stack._env("verifier")["JITGATE_LISTEN"] == f"10.9.2.1:{ports['verifier']}"
    # Others are told where to reach it; agents are told where the proxy is.
    issuer = stack._env("issuer")
    assert issuer["JITGATE_VERIFIER_ADDR"] == f"10.9.2.1:{ports['verifier']}"
    assert issuer["JITGATE_PROXY_ENDPOINT"] == f"10.9.1.1:{ports['proxy']}"
    assert issuer["JITGATE_POLICY_ADDR"] == f"127.0.0.1:{ports['policy']}"  # not placed
    assert stack.client_env()["JITGATE_ISSUER"] == stack.address("issuer")
    assert stack.oidc_issuer == f"https://[::1]:{ports['idp']}/oauth2/default"


def test_a_placed_service_runs_behind_its_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from jitgate.devstack import children

    started: list[list[str]] = []
    monkeypatch.setattr(children, "spawn", lambda argv, **_: started.append(list(argv)))
    stack = _placed(tmp_path)
    stack._spawn("issuer", ["serve", "issuer"], {})
    stack._spawn("policy", ["serve", "policy"], {})
    assert started == [
        ["ip", "netns", "exec", "edge", sys.executable, "-m", "jitgate", "serve", "issuer"],
        [sys.executable, "-m", "jitgate", "serve", "policy"],
    ]


def test_waiting_for_a_placed_service_dials_its_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from jitgate.devstack.stack import Placement

    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))  # Linux answers on all of 127.0.0.0/8
        listener.listen()
        port = listener.getsockname()[1]
        stack = Stack(tmp_path, placements={"proxy": Placement(host="127.0.0.2")})
        stack.ports["proxy"] = port
        monkeypatch.setattr(stack, "_check_alive", lambda name: None)
        stack.wait_listening("proxy", timeout=2)
        stack.placements["proxy"] = Placement(host="127.0.0.3")
        with pytest.raises(ConfigError, match="not listening"):
            stack.wait_listening("proxy", timeout=0.2)


def test_placements_name_known_processes_and_redis_takes_no_prefix(tmp_path: Path) -> None:
    from jitgate.devstack.stack import Placement

    with pytest.raises(ConfigError, match="cannot place"):
        Stack(tmp_path, placements={"postgres": Placement()})
    with pytest.raises(ConfigError, match="no prefix"):
        Stack(tmp_path, placements={"redis": Placement(prefix=("ip", "netns", "exec", "x"))})


def test_placed_redis_listens_on_its_bind_and_is_reached_at_its_host(tmp_path: Path) -> None:
    import redis

    from jitgate.devstack.redis_server import RedisServer, free_port

    server = RedisServer(workdir=tmp_path, port=free_port(), host="127.0.0.2")
    assert "@127.0.0.2:" in server.url("issuer")
    server.start()
    try:
        assert redis.Redis.from_url(server.url("admin")).ping()
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1).ping()
    finally:
        server.stop()
