"""The agent's local grant store and `jitgate grant kubeconfig`, checked with the real kubectl."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import json
import os
import subprocess
from pathlib import Path

import pytest

from jitgate.cli import grant as grant_cli
from jitgate.client import Grant
from jitgate.client.store import GrantStore

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def grant(grant_id: str = "g-123", kind: str = "kubernetes", ttl: float = 600) -> Grant:
    return Grant(
        grant_id=grant_id,
        connection="payments-staging" if kind == "kubernetes" else "orders-replica",
        connection_kind=kind,
        subject="deploy-bot",
        issued_at=NOW,
        expires_at=NOW + datetime.timedelta(seconds=ttl),
        proxy_endpoint="https://127.0.0.1:6443",
        token="grant.token.value",
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$JITGATE_HOME, empty."""
    monkeypatch.setenv("JITGATE_HOME", str(tmp_path / "jg"))
    monkeypatch.delenv("JITGATE_CA", raising=False)
    return tmp_path / "jg"


def run(*argv: str) -> int:
    top = argparse.ArgumentParser(prog="jitgate")
    grant_cli.register(top.add_subparsers(dest="verb", required=True))
    args = top.parse_args(["grant", *argv])
    code: int = args.func(args)
    return code


def test_the_store_is_private_and_keeps_the_token(home: Path) -> None:
    store = GrantStore()
    path = store.save(grant())
    assert path == home / "grants" / "g-123.json"
    assert (home / "grants").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.load("g-123") == grant()
    assert store.load("g-123").token == "grant.token.value"  # type: ignore[union-attr]
    assert store.load("nope") is None
    store.forget("g-123")
    assert store.load("g-123") is None
    store.forget("../x")  # never a path outside the store


def test_the_store_forgets_expired_grants(home: Path) -> None:
    store = GrantStore()
    store.save(grant("old", ttl=-1))
    store.save(grant("live"))
    assert not (home / "grants" / "old.json").exists()
    assert store.load("live") is not None


@pytest.mark.parametrize("grant_id", ["../escape", "a/b", "..", "", "x" * 200])
def test_a_grant_id_never_names_another_file(home: Path, grant_id: str) -> None:
    with pytest.raises(ValueError, match="not a grant id"):
        GrantStore().save(grant(grant_id))
    assert run("kubeconfig", grant_id or "-") == grant_cli.EXIT_NOT_FOUND


def _view(path: Path) -> dict[str, object]:
    """What kubectl itself makes of a kubeconfig."""
    done = subprocess.run(
        ["kubectl", "config", "view", "--raw", "-o", "json"],
        env={"PATH": os.environ["PATH"], "HOME": str(path.parent), "KUBECONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    view: dict[str, object] = json.loads(done.stdout)
    return view


def test_kubeconfig_points_kubectl_at_the_proxy_with_the_grant(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    GrantStore().save(grant())
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    out = tmp_path / "kubeconfig"
    code = run("kubeconfig", "g-123", "-o", str(out), "--ca", str(ca), "-n", "payments")
    assert code == grant_cli.EXIT_OK
    assert out.stat().st_mode & 0o777 == 0o600
    assert "wrote" in capsys.readouterr().out
    view = _view(out)
    [cluster] = view["clusters"]  # type: ignore[misc]
    assert cluster["cluster"]["server"] == "https://127.0.0.1:6443/connections/payments-staging"
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == ca.read_bytes()
    [extension] = cluster["cluster"]["extensions"]
    assert extension["extension"]["grant_id"] == "g-123"
    [user] = view["users"]  # type: ignore[misc]
    assert user["user"] == {"token": "grant.token.value"}  # and nothing else: no cluster secret
    [context] = view["contexts"]  # type: ignore[misc]
    assert context["context"]["namespace"] == "payments"
    assert view["current-context"] == context["name"]
    text = out.read_text()
    assert text.startswith("# jitgate grant g-123 for payments-staging; expires ")


def test_kubeconfig_to_stdout_without_a_namespace(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    GrantStore().save(grant())
    assert run("kubeconfig", "g-123") == grant_cli.EXIT_OK
    text = capsys.readouterr().out
    assert '    token: "grant.token.value"' in text
    assert "namespace" not in text
    assert "certificate-authority" not in text  # the system trust


def test_kubeconfig_refuses_other_kinds_missing_and_expired_grants(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = GrantStore()
    store.save(grant("pg", kind="postgres"))
    assert run("kubeconfig", "pg") == grant_cli.EXIT_USAGE
    assert "postgres connection (orders-replica), not kubernetes" in capsys.readouterr().err
    assert run("kubeconfig", "never-requested") == grant_cli.EXIT_NOT_FOUND
    assert "no live grant never-requested" in capsys.readouterr().err
    store.save(grant("soon", ttl=600))
    data = json.loads((home / "grants" / "soon.json").read_text())
    data["expires_at"] = (NOW - datetime.timedelta(seconds=1)).isoformat()
    (home / "grants" / "soon.json").write_text(json.dumps(data))
    assert run("kubeconfig", "soon") == grant_cli.EXIT_NOT_FOUND
    assert not (home / "grants" / "soon.json").exists()


def test_the_grants_namespace_is_the_contexts_and_survives_the_store(
    home: Path, tmp_path: Path
) -> None:
    GrantStore().save(dataclasses.replace(grant(), namespace="payments"))
    out = tmp_path / "kubeconfig"
    assert run("kubeconfig", "g-123", "-o", str(out)) == grant_cli.EXIT_OK
    [context] = _view(out)["contexts"]  # type: ignore[misc]
    assert context["context"]["namespace"] == "payments"


class _Issuer:
    """An issuer client that grants whatever is asked, as `grant request` calls it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def request_grant(self, connection: str, *, ttl_seconds: int, reason: str) -> Grant:
        return grant(f"g-{self.kind}", kind=self.kind)


@pytest.mark.parametrize("kind", ["postgres", "ssh"])
def test_grant_request_stores_no_token_of_other_kinds(
    home: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(action="request", connection="c", ttl=0, reason="", json=True)
    grant_cli._act(_Issuer(kind), args)  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out)["token"] == "grant.token.value"  # shown once
    assert not list(home.glob("grants/*"))  # and never written to disk


def test_grant_request_stores_a_kubernetes_grant_for_kubeconfig(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(action="request", connection="c", ttl=0, reason="", json=True)
    grant_cli._act(_Issuer("kubernetes"), args)  # type: ignore[arg-type]
    assert GrantStore().load("g-kubernetes") == grant("g-kubernetes")
    assert run("kubeconfig", "g-kubernetes") == grant_cli.EXIT_OK
    assert '    token: "grant.token.value"' in capsys.readouterr().out


def test_grant_request_help_says_only_kubernetes_grants_are_stored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        run("request", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "A kubernetes grant is also kept, token included, in $JITGATE_HOME/grants" in text
    assert "grants of other kinds are not stored" in text
