"""`lint`: one test per code, the order of findings, and the goldens on the example policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitgate.policy.lint import WHOLE_FILE, lint
from jitgate.policy.model import Finding
from tests.policy import golden

CONNECTIONS = """
[connections.replica]
kind = "postgres"
environment = "production"
read_only = true

[connections.primary]
kind = "postgres"
environment = "production"

[connections.staging]
kind = "kubernetes"
environment = "staging"
namespace = "payments"
"""


def bind(group: str, connection: str, max_ttl: str = "5m", **extra: object) -> str:
    lines = [f'group = "{group}"', f'connection = "{connection}"', f'max_ttl = "{max_ttl}"']
    lines += [f"{key} = {str(value).lower()}" for key, value in extra.items()]
    return "\n[[bindings]]\n" + "\n".join(lines) + "\n"


def reachable(text: str) -> str:
    """Text plus bindings that name every connection in CONNECTIONS, with a reason."""
    return text + "".join(
        bind("readers", name, require_reason=True) for name in ("replica", "primary", "staging")
    )


def codes(text: str, *, groups: int = 3, connections: int = 3) -> list[tuple[str, str, str]]:
    found = lint(text, max_connections_per_group=connections, max_groups_per_connection=groups)
    return [(f.severity, f.code, f.path) for f in found]


def test_a_clean_policy_has_no_findings() -> None:
    assert lint(reachable(CONNECTIONS)) == []


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("wildcard = true", "wildcard", "unknown key; expected one of"),
        ('[[bindings]]\ngroup = "g"\nconnection = "x"', "bindings[0].max_ttl", "required"),
        ('[connections.x]\nkind = "mysql"', "connections.x.kind", "'mysql' is not one of"),
        ("[connections.x", WHOLE_FILE, "not valid TOML"),
        ('"weird key" = 1', WHOLE_FILE, "weird key: unknown key"),
    ],
)
def test_invalid_shape_is_one_error_naming_the_path(text: str, path: str, message: str) -> None:
    found = lint(text + "\n" + CONNECTIONS if "connections" not in text else text)
    assert len(found) == 1
    assert (found[0].severity, found[0].code, found[0].path) == ("error", "invalid", path)
    assert found[0].message.startswith(message)


def test_invalid_encoding() -> None:
    found = lint(b"\xff\xfe", "policy.toml")
    assert found == [
        Finding(severity="error", code="invalid", path=WHOLE_FILE, message="not UTF-8")
    ]


def test_unknown_connection() -> None:
    found = codes(reachable(CONNECTIONS + bind("platform", "replcia")))
    assert found == [("error", "unknown-connection", "bindings[0].connection")]


def test_ttl_above_ceiling() -> None:
    found = codes(reachable(CONNECTIONS + bind("platform", "replica", "16m")))
    assert found == [("error", "ttl-above-ceiling", "bindings[0].max_ttl")]


def test_a_raised_ceiling_allows_longer() -> None:
    assert lint(reachable('ttl_ceiling = "1h"\n' + CONNECTIONS + bind("p", "replica", "16m"))) == []


def test_duplicate_binding() -> None:
    text = CONNECTIONS + bind("platform", "replica") + bind("platform", "replica", "1m")
    assert codes(reachable(text)) == [("error", "duplicate-binding", "bindings[1]")]


def test_broad_group() -> None:
    text = CONNECTIONS + "".join(
        bind("ops", name, require_reason=True) for name in ("replica", "primary", "staging")
    )
    assert codes(text) == []  # exactly the limit is fine
    assert codes(text, connections=2) == [("warning", "broad-group", "bindings[2]")]
    (finding,) = lint(text, max_connections_per_group=2)
    assert finding.message.startswith(
        "'ops' reaches 3 connections (more than 2): replica, primary, staging"
    )


def test_broad_connection() -> None:
    text = CONNECTIONS + "".join(bind(g, "replica") for g in ("a", "b", "c", "d"))
    found = codes(reachable(text))
    assert found == [("warning", "broad-connection", "connections.replica")]
    assert "5 groups reach it (more than 3): a, b, c, d, readers" in str(lint(reachable(text))[0])
    assert codes(reachable(text), groups=5) == []


def test_unreachable_connection() -> None:
    text = CONNECTIONS + bind("p", "replica") + bind("p", "staging")
    assert codes(text) == [("warning", "unreachable-connection", "connections.primary")]


def test_production_without_reason() -> None:
    text = reachable(CONNECTIONS + bind("writers", "primary"))
    assert codes(text) == [("warning", "production-without-reason", "bindings[0]")]


@pytest.mark.parametrize(
    "binding",
    [
        bind("w", "primary", require_reason=True),  # says why
        bind("w", "replica"),  # read-only
        bind("w", "staging"),  # not production
    ],
)
def test_no_reason_needed(binding: str) -> None:
    assert lint(reachable(CONNECTIONS + binding)) == []


def test_production_at_ceiling() -> None:
    text = reachable(CONNECTIONS + bind("w", "primary", "15m", require_reason=True))
    assert codes(text) == [("warning", "production-at-ceiling", "bindings[0].max_ttl")]
    for other in (bind("w", "primary", "14m", require_reason=True), bind("w", "replica", "15m")):
        assert lint(reachable(CONNECTIONS + other)) == []


def test_untagged_connection() -> None:
    text = CONNECTIONS + '[connections.mystery]\nkind = "ssh"\n'
    found = codes(reachable(text + bind("p", "mystery")))
    assert found == [("warning", "untagged-connection", "connections.mystery")]


def test_no_tags_at_all_is_a_choice() -> None:
    text = '[connections.a]\nkind = "ssh"\n[connections.b]\nkind = "ssh"\n'
    assert lint(text + bind("p", "a") + bind("p", "b")) == []


def test_errors_first_then_paths_in_number_order() -> None:
    text = CONNECTIONS + bind("w", "primary") + "".join(bind(f"g{i}", "nope") for i in range(11))
    found = lint(text)
    assert [f.severity for f in found] == ["error"] * 11 + ["warning"] * 3
    assert [f.path for f in found][:3] == [
        "bindings[1].connection",
        "bindings[2].connection",
        "bindings[3].connection",
    ]
    assert found[10].path == "bindings[11].connection"
    assert [f.path for f in found[11:]] == [
        "bindings[0]",
        "connections.replica",
        "connections.staging",
    ]


def test_the_example_passes() -> None:
    found = lint((golden.ROOT / golden.EXAMPLE).read_bytes())
    assert [f for f in found if f.severity == "error"] == []


def test_the_broken_example_fails() -> None:
    found = codes((golden.ROOT / golden.BROKEN).read_text())
    assert ("error", "ttl-above-ceiling", "bindings[0].max_ttl") in found
    assert ("error", "unknown-connection", "bindings[1].connection") in found


@pytest.mark.parametrize(
    ("policy", "name"),
    [
        (golden.EXAMPLE, "lint-example.txt"),
        (golden.WIDENED, "lint-widened.txt"),
        (golden.BROKEN, "lint-broken.txt"),
    ],
)
def test_golden(policy: Path, name: str) -> None:
    found = lint((golden.ROOT / policy).read_bytes(), str(policy))
    golden.check(name, "".join(f"{f}\n" for f in found))
