"""`jitgate policy lint|explain`: exit codes, JSON that parses, escaped output, goldens."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jitgate.cli import policy as policy_cli
from tests.policy import golden

EXAMPLE, WIDENED, BROKEN = str(golden.EXAMPLE), str(golden.WIDENED), str(golden.BROKEN)


@pytest.fixture(autouse=True)
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """File names in outputs are relative to the repository, as in the goldens."""
    monkeypatch.chdir(golden.ROOT)


def run(*argv: str) -> int:
    top = argparse.ArgumentParser(prog="jitgate")
    policy_cli.register(top.add_subparsers(dest="verb", required=True))
    args = top.parse_args(["policy", *argv])
    code: int = args.func(args)
    return code


def command(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitgate", "policy", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=golden.ROOT,
    )


def test_the_example_is_the_devstack_policy() -> None:
    shipped = golden.ROOT / "services/devstack/examples/policy.toml"
    assert (golden.ROOT / EXAMPLE).read_bytes() == shipped.read_bytes()


def test_lint_passes_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("lint", EXAMPLE) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"{EXAMPLE}: 0 errors, 1 warning\n")
    golden.check("cli-lint-example.txt", out)


def test_lint_fails_above_the_ceiling_and_on_an_unknown_connection(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("lint", BROKEN) == 1
    out = capsys.readouterr().out
    assert "error: bindings[0].max_ttl: 3600s is above ttl_ceiling 900s [ttl-above-ceiling]" in out
    assert "error: bindings[1].connection: 'orders-replcia' is not a connection" in out
    assert out.endswith(f"{BROKEN}: 2 errors, 1 warning\n")


def test_lint_fails_on_one_error(tmp_path: Path) -> None:
    for text in ('[[bindings]]\ngroup="g"\nconnection="x"\nmax_ttl=5', "ttl_ceiling = true"):
        (tmp_path / "p.toml").write_text(text)
        assert run("lint", str(tmp_path / "p.toml")) == 1


def test_lint_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("lint", BROKEN, "--json") == 1
    document = json.loads(capsys.readouterr().out)
    assert (document["source"], document["errors"], document["warnings"]) == (BROKEN, 2, 1)
    assert [f["code"] for f in document["findings"]] == [
        "ttl-above-ceiling",
        "unknown-connection",
        "production-without-reason",
    ]
    assert list(document["findings"][0]) == ["code", "message", "path", "severity"]


def test_lint_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("lint", EXAMPLE, "--max-connections-per-group", "1") == 0
    assert "[broad-group]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        run("lint", EXAMPLE, "--max-groups-per-connection", "0")
    assert caught.value.code == 2


def test_lint_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("lint", "no/such.toml") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot read no/such.toml" in captured.err


def test_lint_escapes_what_it_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.toml").write_text('"evil\\u001b]0;owned\\u0007" = 1\n')
    assert run("lint", str(tmp_path / "p.toml")) == 1
    out = capsys.readouterr().out
    assert not {"\x1b", "\x07"} & set(out)
    assert "evil\\x1b]0;owned\\x07: unknown key" in out


def test_a_missing_file_name_is_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("lint", "evil\x1b[2J.toml") == 2
    assert "evil\\x1b[2J.toml" in capsys.readouterr().err


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", EXAMPLE) == 0
    golden.check("cli-explain-example.txt", capsys.readouterr().out)


def test_explain_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", EXAMPLE, "--group", "platform", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["reach"]
    assert [r["connection"] for r in rows] == ["orders-replica", "payments-staging"]
    assert run("explain", EXAMPLE, "--connection", "bastion-eu1", "--json") == 0
    assert [r["group"] for r in json.loads(capsys.readouterr().out)["reach"]] == ["sre"]


def test_explain_refuses_a_policy_with_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", BROKEN) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not a usable policy" in captured.err
    assert f"jitgate policy lint {BROKEN}" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ("explain",),
        ("explain", EXAMPLE, "--diff", EXAMPLE, WIDENED),
        ("explain", EXAMPLE, "--fail-on-widen"),
        ("explain", "no/such.toml"),
        ("explain", "--diff", EXAMPLE, "no/such.toml"),
    ],
)
def test_explain_usage_and_unreadable_files(argv: tuple[str, ...]) -> None:
    assert run(*argv) == 2


def test_diff(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", "--diff", EXAMPLE, WIDENED) == 0
    golden.check("cli-diff-widened.txt", capsys.readouterr().out)


def test_diff_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", "--diff", EXAMPLE, WIDENED, "--json") == 0
    found = json.loads(capsys.readouterr().out)
    assert found["widens"] is True
    assert [(c["group"], c["connection"]) for c in found["widened"]] == [
        ("platform", "orders-replica"),
        ("billing-oncall", "billing-primary"),
    ]


def test_diff_filtered(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", "--diff", EXAMPLE, WIDENED, "--group", "sre", "--fail-on-widen") == 0
    assert capsys.readouterr().out.startswith("narrowed  sre -> bastion-eu1: max_ttl 15m -> 10m\n")


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [(EXAMPLE, WIDENED, 3), (WIDENED, EXAMPLE, 3), (EXAMPLE, EXAMPLE, 0)],
)
def test_fail_on_widen(old: str, new: str, code: int) -> None:
    # Back from WIDENED restores sre's 15m: that too is wider, so it fails.
    assert run("explain", "--diff", old, new, "--fail-on-widen") == code


def test_diff_of_a_broken_policy() -> None:
    assert run("explain", "--diff", EXAMPLE, BROKEN) == 1


def test_the_jitgate_command() -> None:
    passed = command("lint", EXAMPLE)
    assert passed.returncode == 0, passed.stderr
    failed = command("lint", BROKEN)
    assert failed.returncode == 1, failed.stderr
    assert "[ttl-above-ceiling]" in failed.stdout
    assert "[unknown-connection]" in failed.stdout
    widens = command("explain", "--diff", EXAMPLE, WIDENED, "--fail-on-widen")
    assert widens.returncode == 3, widens.stderr
