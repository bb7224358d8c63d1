"""`jitgate dev-idp serve` as a real process, and `jitgate dev-idp token` against it."""

from __future__ import annotations

import argparse
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from jitgate.cli import devidp
from jitgate.common.errors import ConfigError
from jitgate.devstack import pki

# The dev-idp verb on its own, with the exit-code handling of `jitgate`'s main,
# so these tests do not depend on every other verb being importable.
SCRIPT = """
import argparse, sys
from jitgate.cli import devidp
from jitgate.common.errors import ConfigError
parser = argparse.ArgumentParser(prog="jitgate")
devidp.register(parser.add_subparsers(dest="verb", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except ConfigError as exc:
    print(f"jitgate: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jitgate")
    devidp.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _start(dev: pki.DevPki, state: Path, *extra: str) -> subprocess.Popen[str]:
    files = dev.files("idp")
    argv = ["dev-idp", "serve", "--dir", str(state), "--listen", "127.0.0.1:0"]
    argv += ["--tls-cert", str(files.cert), "--tls-key", str(files.key), *extra]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _issuer(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 20)
    assert ready, "the dev IdP did not report its issuer"
    line = process.stdout.readline().strip()
    assert line.startswith("dev-idp issuer https://127.0.0.1:"), line
    return line.removeprefix("dev-idp issuer ")


@pytest.fixture
def served(dev_pki: pki.DevPki, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    process = _start(dev_pki, tmp_path / "state")
    try:
        yield _issuer(process), process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_token_prints_only_a_token_from_the_served_idp(
    dev_pki: pki.DevPki,
    served: tuple[str, subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    issuer, _ = served
    code = _run(["dev-idp", "token", "deploy-bot", "--issuer", issuer, "--ca", str(dev_pki.ca)])
    out = capsys.readouterr().out
    assert code == 0
    [token] = out.splitlines()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iss"], claims["sub"], claims["groups"]) == (issuer, "deploy-bot", ["platform"])


def test_serve_stops_cleanly_on_sigterm_and_sigint(
    dev_pki: pki.DevPki, tmp_path: Path, served: tuple[str, subprocess.Popen[str]]
) -> None:
    _, process = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    again = _start(dev_pki, tmp_path / "state")
    try:
        _issuer(again)
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=10) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()


def test_a_refused_agent_exits_1(
    dev_pki: pki.DevPki,
    served: tuple[str, subprocess.Popen[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    issuer, _ = served
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.deploy-bot]\nsecret = "guessed"\n')
    argv = ["dev-idp", "token", "deploy-bot", "--issuer", issuer, "--ca", str(dev_pki.ca)]
    assert _run([*argv, "--agents", str(agents)]) == devidp.EXIT_REFUSED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid_client" in captured.err
    assert _run([*argv, "--scope", "admin"]) == devidp.EXIT_REFUSED
    assert "invalid_scope" in capsys.readouterr().err


def test_an_unreachable_idp_exits_3(dev_pki: pki.DevPki) -> None:
    issuer = "https://127.0.0.1:1/oauth2/default"
    argv = ["dev-idp", "token", "deploy-bot", "--issuer", issuer, "--ca", str(dev_pki.ca)]
    assert _run(argv) == devidp.EXIT_UNAVAILABLE


def test_an_unknown_agent_is_a_config_error(dev_pki: pki.DevPki) -> None:
    argv = ["dev-idp", "token", "nobody", "--issuer", "https://127.0.0.1:1/oauth2/default"]
    with pytest.raises(ConfigError, match="no agent 'nobody'; known: deploy-bot, intern-bot"):
        _run(argv)


def test_serve_refuses_a_bad_agents_file(dev_pki: pki.DevPki, tmp_path: Path) -> None:
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.a]\nsecret = "s"\ngroup = ["x"]\n')
    process = _start(dev_pki, tmp_path / "state", "--agents", str(agents))
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "agents.a.group is not a known key" in err


def test_serve_refuses_a_listen_address_off_loopback(dev_pki: pki.DevPki, tmp_path: Path) -> None:
    files = dev_pki.files("idp")
    argv = ["dev-idp", "serve", "--dir", str(tmp_path), "--listen", "0.0.0.0:0"]
    argv += ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    with pytest.raises(ConfigError, match="loopback"):
        _run(argv)
