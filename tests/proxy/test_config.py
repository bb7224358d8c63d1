"""connections.toml: strict, and the secret read by reference, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitgate.common.errors import ConfigError
from jitgate.proxy import config

GOOD = """
[connections.orders-replica]
host = "db.internal"
port = 5433
database = "orders"
user = "jitgate_orders_ro"
password_file = "secrets/orders"
tls = "verify-full"
ca_file = "ca.pem"
read_only = true

[connections.local]
socket_dir = "/run/postgresql"
database = "app"
user = "jitgate_app"
password_env = "JG_TEST_APP_PASSWORD"
"""


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "orders").write_text("s3cret-orders\n")
    monkeypatch.setenv("JG_TEST_APP_PASSWORD", "s3cret-app")
    return tmp_path


def test_a_good_file(base: Path) -> None:
    upstreams = config.parse(GOOD, base=base)
    orders = upstreams["orders-replica"]
    assert (orders.host, orders.port, orders.tls, orders.read_only) == (
        "db.internal",
        5433,
        "verify-full",
        True,
    )
    assert orders.password == "s3cret-orders"
    assert upstreams["local"].password == "s3cret-app"
    assert "s3cret" not in repr(upstreams)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('host = "db.internal"', "exactly one of host, socket_dir"),
        ('password_file = "x"', "exactly one of password_file, password_env"),
        ('tls = "prefer"', "is not one of"),
        ("port = 0", "port: must be"),
        ("read_only = 1", "read_only: must be true or false"),
        ('shell = "yes"', "shell: unknown key"),
    ],
)
def test_mistakes_name_their_key(base: Path, change: str, message: str) -> None:
    text = GOOD.replace('database = "app"', f'database = "app"\n{change}')
    with pytest.raises(ConfigError, match=message):
        config.parse(text, base=base)


def test_an_unreadable_secret_names_the_file_not_its_content(base: Path) -> None:
    text = GOOD.replace("secrets/orders", "secrets/missing")
    with pytest.raises(ConfigError, match="secrets/missing") as raised:
        config.parse(text, base=base)
    assert "s3cret" not in str(raised.value)


def test_an_empty_secret_is_refused(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JG_TEST_APP_PASSWORD", "")
    with pytest.raises(ConfigError, match="password is empty"):
        config.parse(GOOD, base=base)


def test_tls_over_a_unix_socket_is_refused(base: Path) -> None:
    text = GOOD.replace('database = "app"', 'database = "app"\ntls = "require"')
    with pytest.raises(ConfigError, match="Unix socket does not use TLS"):
        config.parse(text, base=base)


OTHER_KINDS = """
[connections.bastion-eu1]
kind = "ssh"
host = "bastion.internal"
user = "jitgate"
key_file = "secrets/bastion_ed25519"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMb0pin bastion"

[connections.payments-staging]
kind = "kubernetes"
server = "https://k8s.staging.internal:6443/"
namespace = "payments"
token_env = "JG_TEST_KUBE_TOKEN"
ca_file = "staging-ca.pem"
allow_exec = true
"""


@pytest.fixture
def kinds_base(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (base / "secrets" / "bastion_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")
    monkeypatch.setenv("JG_TEST_KUBE_TOKEN", "s3cret-sa-token")
    return base


def test_ssh_and_kubernetes_connections(kinds_base: Path) -> None:
    found = config.parse(OTHER_KINDS, base=kinds_base)
    ssh = found["bastion-eu1"]
    assert isinstance(ssh, config.SshTarget)
    assert (ssh.host, ssh.port, ssh.user) == ("bastion.internal", 22, "jitgate")
    assert not ssh.allow_agent_forwarding
    assert not ssh.allow_port_forwarding
    kube = found["payments-staging"]
    assert isinstance(kube, config.KubeTarget)
    assert kube.server == "https://k8s.staging.internal:6443"
    assert kube.ca_file == str(kinds_base / "staging-ca.pem")
    assert (kube.namespace, kube.allow_exec, kube.allow_port_forward) == ("payments", True, False)
    assert config.of_kind(found, config.Upstream) == {}
    assert list(config.of_kind(found, config.SshTarget)) == ["bastion-eu1"]
    # The key and the token are in memory only, never in a repr (and so a log line).
    assert "PRIVATE KEY" not in repr(found)
    assert "s3cret" not in repr(found)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('kind = "ssh"', 'kind = "rdp"', "is not one of postgres, ssh, kubernetes"),
        ('host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMb0pin bastion"', "", "host_key"),
        ('"ssh-ed25519 AAAAC3', '"AAAAC3', "host_key: must be an OpenSSH public key"),
        ('key_file = "secrets/bastion_ed25519"', 'key_env = "X"', "key_env: unknown key"),
        ('key_file = "secrets/bastion_ed25519"', "", "key_file: required"),
        ('"https://k8s.staging.internal:6443/"', '"http://k8s"', "server: must be an https"),
        ('namespace = "payments"', 'namespace = "Pay_ments"', "namespace: must be a DNS-1123"),
        ("allow_exec = true", 'allow_exec = "yes"', "allow_exec: must be true or false"),
        ('token_env = "JG_TEST_KUBE_TOKEN"', "", "exactly one of token_file, token_env"),
        ('ca_file = "staging-ca.pem"', 'database = "x"', "database: unknown key"),
    ],
)
def test_other_kinds_mistakes_name_their_key(
    kinds_base: Path, old: str, new: str, message: str
) -> None:
    assert old in OTHER_KINDS
    with pytest.raises(ConfigError, match=message):
        config.parse(OTHER_KINDS.replace(old, new), base=kinds_base)


@pytest.mark.parametrize(
    ("ending", "where"),
    [("\r\n", "env"), (" \n", "file"), ("\t", "env"), ("  ", "file"), (" ", "env")],
)
def test_a_kubernetes_token_is_stripped_whole(
    kinds_base: Path, monkeypatch: pytest.MonkeyPatch, ending: str, where: str
) -> None:
    text = OTHER_KINDS
    if where == "file":
        (kinds_base / "sa.token").write_text("sa-Token_1.2~3+4/5==" + ending)
        text = text.replace('token_env = "JG_TEST_KUBE_TOKEN"', 'token_file = "sa.token"')
    else:
        monkeypatch.setenv("JG_TEST_KUBE_TOKEN", "sa-Token_1.2~3+4/5==" + ending)
    kube = config.parse(text, base=kinds_base)["payments-staging"]
    assert isinstance(kube, config.KubeTarget)
    assert kube.token == "sa-Token_1.2~3+4/5=="


@pytest.mark.parametrize(
    ("token", "key"),
    [
        ("s3cret part two", "token_env"),
        ("s3cret\rmore", "token_env"),
        ("s3cret=tail", "token_env"),
        ('s3cret"quoted', "token_file"),
        ("s3cret\u00e9", "token_file"),
    ],
)
def test_a_kubernetes_token_outside_rfc_6750_is_refused_by_key_not_value(
    kinds_base: Path, monkeypatch: pytest.MonkeyPatch, token: str, key: str
) -> None:
    text = OTHER_KINDS
    if key == "token_file":
        (kinds_base / "sa.token").write_text(token)
        text = text.replace('token_env = "JG_TEST_KUBE_TOKEN"', 'token_file = "sa.token"')
    else:
        monkeypatch.setenv("JG_TEST_KUBE_TOKEN", token)
    with pytest.raises(
        ConfigError, match=rf"connections\.payments-staging\.{key}: .*RFC 6750"
    ) as raised:
        config.parse(text, base=kinds_base)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("https://", "https:// URL with a host"),
        ("https://:6443", "https:// URL with a host"),
        ("HTTP://k8s.internal", "https:// URL with a host"),
        ("k8s.internal:6443", "https:// URL with a host"),
        ("https://k8s.internal:99999", "not a valid URL"),
        ("https://k8s.internal:64x3", "not a valid URL"),
        ("https://k8s.internal:0", "port must be 1 to 65535"),
        ("https://k8s.internal:", "port must be 1 to 65535"),
        ("https://admin:pw@k8s.internal", "no user or password"),
        ("https://admin@k8s.internal", "no user or password"),
        ("https://k8s.internal/?x=1", "no query or fragment"),
        ("https://k8s.internal?", "no query or fragment"),
        ("https://k8s.internal/#frag", "no query or fragment"),
        ("https://k8s.internal/a/../b", "path prefix"),
        ("https://k8s.internal/a%2Fb", "path prefix"),
        ("https://k8s.internal//a", "path prefix"),
    ],
)
def test_a_bad_kubernetes_server_url_stops_startup(
    kinds_base: Path, server: str, message: str
) -> None:
    text = OTHER_KINDS.replace("https://k8s.staging.internal:6443/", server)
    with pytest.raises(ConfigError, match=rf"connections\.payments-staging\.server: .*{message}"):
        config.parse(text, base=kinds_base)


@pytest.mark.parametrize(
    "server",
    ["https://k8s.internal", "https://[fd00::1]:6443", "https://k8s.internal:6443/prefix/k8s/"],
)
def test_a_good_kubernetes_server_url(kinds_base: Path, server: str) -> None:
    text = OTHER_KINDS.replace("https://k8s.staging.internal:6443/", server)
    kube = config.parse(text, base=kinds_base)["payments-staging"]
    assert isinstance(kube, config.KubeTarget)
    assert kube.server == server.rstrip("/")  # kube.py puts the path prefix before each path
