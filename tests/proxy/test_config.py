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
