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
