"""`jitgate keys init|rotate|list`: exit 0 done, 1 refused by the keys' state, 2 unusable."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jitgate.cli import keys as keys_cli
from jitgate.cli.main import main
from jitgate.policy import keyring
from jitgate.policy.keyring import format_time

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    """Seconds since the epoch that move only when told."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(keys_cli, "clock", fake)
    return fake


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(["keys", *argv])
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def _listed(capsys: pytest.CaptureFixture[str], directory: Path) -> list[dict[str, Any]]:
    code, out, _ = _run(capsys, "list", str(directory), "--json")
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def _states(capsys: pytest.CaptureFixture[str], directory: Path) -> list[tuple[str, str]]:
    return [(row["kid"], row["state"]) for row in _listed(capsys, directory)]


def test_init_creates_the_first_key_and_list_shows_it(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "grant-keys"
    code, out, err = _run(capsys, "init", str(directory))
    assert (code, err) == (0, "")
    [entry] = keyring.read_manifest(directory)
    assert entry.kid in out
    assert stat.S_IMODE(keyring.key_path(directory, entry.kid).stat().st_mode) == 0o600
    assert _listed(capsys, directory) == [
        {
            "kid": entry.kid,
            "state": "active",
            "created_at": "2026-01-01T00:00:00Z",
            "activate_at": "2026-01-01T00:00:00Z",
            "retire_at": None,
        }
    ]
    code, out, _ = _run(capsys, "list", str(directory))
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["KID", "STATE"]
    assert row.split() == [entry.kid, "active", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "-"]


def test_init_twice_is_refused(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "init", str(tmp_path))[0] == 0
    before = (tmp_path / keyring.MANIFEST).read_bytes()
    code, _, err = _run(capsys, "init", str(tmp_path))
    assert code == 1
    assert "already holds grant keys" in err
    assert (tmp_path / keyring.MANIFEST).read_bytes() == before


def test_rotate_publishes_ahead_then_the_new_key_signs_and_the_old_retires(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "init", str(tmp_path))
    [(old, _)] = _states(capsys, tmp_path)
    clock.now = T0 + 100
    code, out, err = _run(capsys, "rotate", str(tmp_path), "--ttl-ceiling", "15m", "--margin", "60")
    assert (code, err) == (0, "")
    [(_, _), (new, state)] = _states(capsys, tmp_path)
    assert state == "next"
    activate_at, retire_at = T0 + 160, T0 + 160 + 900 + 60
    assert f"signing from {format_time(activate_at)}" in out
    assert f"kid {old} stays published until {format_time(retire_at)}" in out

    # A second rotation while one is waiting is refused, and changes nothing.
    code, _, err = _run(capsys, "rotate", str(tmp_path))
    assert code == 1
    assert f"kid {new} is already next" in err

    clock.now = activate_at
    assert _states(capsys, tmp_path) == [(old, "retiring"), (new, "active")]
    clock.now = retire_at
    assert _states(capsys, tmp_path) == [(old, "retired"), (new, "active")]

    # The next rotation, told the same ceiling and margin, deletes the retired key.
    code, out, _ = _run(capsys, "rotate", str(tmp_path), "--ttl-ceiling", "15m", "--margin", "60")
    assert code == 0
    assert f"removed retired kid {old}" in out
    assert old not in [kid for kid, _ in _states(capsys, tmp_path)]
    assert not keyring.key_path(tmp_path, old).exists()


def test_hold_then_activate_after_the_publish_ahead_delay(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "init", str(tmp_path))
    code, out, _ = _run(capsys, "rotate", str(tmp_path), "--hold")
    assert code == 0
    assert "--activate" in out
    [(old, _), (new, _)] = _states(capsys, tmp_path)
    assert [state for _, state in _states(capsys, tmp_path)] == ["active", "next"]
    assert _listed(capsys, tmp_path)[1]["activate_at"] is None

    clock.now = T0 + 30
    code, _, err = _run(capsys, "rotate", str(tmp_path), "--activate")
    assert code == 1
    assert f"may sign from {format_time(T0 + 60)}" in err
    assert _states(capsys, tmp_path) == [(old, "active"), (new, "next")]

    clock.now = T0 + 60
    code, out, _ = _run(
        capsys, "rotate", str(tmp_path), "--activate", "--ttl-ceiling", "5m", "--margin", "1m"
    )
    assert code == 0
    assert f"kid {new} is active from {format_time(T0 + 60)}" in out
    assert f"until {format_time(T0 + 60 + 300 + 60)}" in out
    assert _states(capsys, tmp_path) == [(old, "retiring"), (new, "active")]

    code, _, err = _run(capsys, "rotate", str(tmp_path), "--activate")
    assert code == 1
    assert "no key is next" in err


def test_the_ceiling_can_come_from_the_policy_file(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('ttl_ceiling = "10m"\n')
    directory = tmp_path / "keys"
    _run(capsys, "init", str(directory))
    code, out, _ = _run(
        capsys,
        "rotate",
        str(directory),
        "--policy",
        str(policy),
        "--publish-ahead",
        "0",
        "--margin",
        "0",
    )
    assert code == 0
    assert f"until {format_time(T0 + 1 + 600)}" in out


def test_without_a_ceiling_the_longest_any_policy_allows_is_assumed(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "init", str(tmp_path))
    code, out, _ = _run(capsys, "rotate", str(tmp_path), "--margin", "0")
    assert code == 0
    assert f"until {format_time(T0 + 60 + 12 * 3600)}" in out


def test_a_key_is_deleted_only_when_the_ceiling_given_says_it_is_retired(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "init", str(tmp_path))
    [(old, _)] = _states(capsys, tmp_path)
    _run(
        capsys,
        "rotate",
        str(tmp_path),
        "--ttl-ceiling",
        "1m",
        "--margin",
        "0",
        "--publish-ahead",
        "0",
    )
    clock.now = T0 + 3600  # retired by the manifest's retire_at
    assert _states(capsys, tmp_path)[0] == (old, "retired")
    # Without --ttl-ceiling a grant might last 12 h: the key is kept, to be safe.
    code, out, _ = _run(capsys, "rotate", str(tmp_path), "--hold")
    assert code == 0
    assert "removed" not in out
    assert keyring.key_path(tmp_path, old).exists()


@pytest.mark.parametrize("action", [["list"], ["rotate"], ["rotate", "--activate"]])
def test_a_directory_without_keys_exits_2(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    for target in (tmp_path, tmp_path / "missing"):
        code, _, err = _run(capsys, action[0], str(target), *action[1:])
        assert code == 2
        assert "jitgate: " in err
    assert not (tmp_path / "missing").exists()


def test_a_broken_manifest_exits_2(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "init", str(tmp_path))
    (tmp_path / keyring.MANIFEST).write_text('{"format": 1, "keys": [')
    for action in ("list", "rotate"):
        code, _, err = _run(capsys, action, str(tmp_path))
        assert code == 2
        assert "not JSON" in err


def test_init_where_a_file_is_exits_2(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = _run(capsys, "init", str(tmp_path / "file" / "keys"))
    assert code == 2
    assert "cannot create" in err


@pytest.mark.parametrize(
    "argv",
    [["rotate", "DIR", "--publish-ahead", "soon"], ["rotate", "DIR", "--hold", "--activate"]],
)
def test_bad_usage_exits_2(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, _ = _run(capsys, *[str(tmp_path) if a == "DIR" else a for a in argv])
    assert code == 2


def test_the_installed_command(tmp_path: Path) -> None:
    def jitgate(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jitgate", "keys", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert jitgate("init", str(tmp_path)).returncode == 0
    assert jitgate("init", str(tmp_path)).returncode == 1
    rotated = jitgate("rotate", str(tmp_path), "--publish-ahead", "0", "--ttl-ceiling", "1m")
    assert rotated.returncode == 0, rotated.stderr
    listed = jitgate("list", str(tmp_path), "--json")
    assert listed.returncode == 0
    assert sorted(json.loads(line)["state"] for line in listed.stdout.splitlines()) in (
        ["active", "retiring"],
        ["active", "next"],  # in the second it was made: it signs from the next one
    )
    assert jitgate("list", str(tmp_path / "nowhere")).returncode == 2
