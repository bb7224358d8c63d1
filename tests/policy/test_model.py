"""The policy file is parsed strictly: every error names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitgate.common.errors import ConfigError
from jitgate.devstack.stack import EXAMPLES
from jitgate.policy import model

GOOD = """
ttl_ceiling = "15m"
[connections.orders-replica]
kind = "postgres"
description = "replica"
[[bindings]]
group = "platform"
connection = "orders-replica"
max_ttl = "5m"
"""


def test_a_good_file() -> None:
    policy = model.parse(GOOD)
    assert policy.connections["orders-replica"].kind == "postgres"
    assert policy.bindings == (
        model.Binding(group="platform", connection="orders-replica", max_ttl=300),
    )
    assert policy.ttl_ceiling == 900
    assert len(policy.version) == 64


def test_the_version_changes_with_the_text() -> None:
    assert model.parse(GOOD).version != model.parse(GOOD + "\n").version


def test_an_empty_policy_has_no_bindings() -> None:
    policy = model.parse("")
    assert policy.bindings == ()
    assert not policy.connections


def test_the_bundled_example_parses() -> None:
    policy = model.load(EXAMPLES / "policy.toml")
    assert {b.group for b in policy.bindings} >= {"platform"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wildcard = true", "wildcard: unknown key"),
        ("[connections.x]\nkind = 'postgres'\nowner = 'me'", "connections.x.owner: unknown key"),
        ("[connections.x]\nkind = 'mysql'", "connections.x.kind"),
        ("[connections.x]\ndescription = 'no kind'", "connections.x.kind: required"),
        ("[connections.X]\nkind = 'ssh'", "connections.X: the name"),
        ("[connections.x]\nkind = 1", "connections.x.kind: must be a string"),
        ("connections = 3", "connections: must be a table"),
        ("bindings = 3", "bindings: must be an array"),
        ("[[bindings]]\ngroup = 'g'\nconnection = 'nope'\nmax_ttl = 5", "bindings[0].connection"),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'",
            "max_ttl: required",
        ),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl='1d'",
            "is not a duration",
        ),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl='20m'",
            "above ttl_ceiling",
        ),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=true",
            "must be seconds",
        ),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup=''\nconnection='x'\nmax_ttl=5",
            "group: must not be empty",
        ),
        (
            "[connections.x]\nkind='ssh'\n"
            "[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=5\n"
            "[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=9\n",
            "bindings[1]: duplicate binding",
        ),
        (
            "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=5\n"
            "connections_all = true",
            "bindings[0].connections_all: unknown key",
        ),
        ("ttl_ceiling = 0", "ttl_ceiling: must be between"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_errors_name_the_key_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        model.parse(text)
    assert message in str(raised.value)


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        model.load(tmp_path / "missing.toml")
