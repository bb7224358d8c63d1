"""The policy file is parsed strictly: every error names its key path."""

from __future__ import annotations

import json
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
            "bindings[0].group: '' is not a group name",
        ),
        (
            "[connections.x]\nkind='ssh'\n"
            "[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=5\n"
            "[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl=9\n",
            "bindings[1]: 'g' is bound to 'x' again",
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


@pytest.mark.parametrize("group", [" ", " platform", "platform ", "*", "plat*", "a\tb"])
def test_group_names_that_mislead_are_refused(group: str) -> None:
    text = f"[connections.x]\nkind='ssh'\n[[bindings]]\ngroup={json.dumps(group)}\n"
    text += "connection='x'\nmax_ttl=5"
    with pytest.raises(ConfigError, match="is not a group name"):
        model.parse(text)


def test_a_group_name_with_inner_spaces_is_fine() -> None:
    text = "[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='Platform Team'\n"
    text += "connection='x'\nmax_ttl=5"
    assert model.parse(text).bindings[0].group == "Platform Team"


@pytest.mark.parametrize("ttl", ["'\u0665m'", "'\uff11\uff15m'"])
def test_durations_take_ascii_digits_only(ttl: str) -> None:
    text = f"[connections.x]\nkind='ssh'\n[[bindings]]\ngroup='g'\nconnection='x'\nmax_ttl={ttl}"
    with pytest.raises(ConfigError, match="is not a duration"):
        model.parse(text)


def test_the_version_is_the_sha256_of_the_files_bytes(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "policy.toml"
    path.write_bytes(GOOD.replace("\n", "\r\n").encode())
    assert model.load(path).version == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert "orders-replica" in model.load(path).connections


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"ttl_ceiling = '\xff'")
    with pytest.raises(ConfigError, match="not UTF-8"):
        model.load(path)


def test_load_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        model.load(tmp_path / "missing.toml")
