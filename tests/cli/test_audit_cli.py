"""`jitgate audit verify|show`: exit 0 when the log verifies, the failure's code otherwise."""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jitgate.audit.checkpoint import verifier_key_string
from jitgate.audit.record import StoredRecord, format_time, seal
from jitgate.audit.store import SqliteStore
from jitgate.audit.verify import Failure
from jitgate.cli import audit as audit_cli
from tests.audit.factory import ORIGIN, SIGNER, checkpoint_for

VKEY = verifier_key_string(ORIGIN, SIGNER.private_key.public_key())

T0 = 1_735_787_045.0
EVENTS: list[dict[str, Any]] = [
    {
        "decision": {
            "allowed": True,
            "connection": "orders-replica",
            "identity": {"subject": "agent-7", "groups": ["platform"]},
            "reason_code": "ALLOWED",
            "grant_id": "ab" * 16,
            "expires_at": "2025-01-02T03:09:05Z",
        }
    },
    {
        "decision": {
            "connection": "billing-primary",
            "identity": {"subject": "agent-7"},
            "reason_code": "NO_BINDING",
        }
    },
    {
        "token_rejected": {
            "reason": "audience",
            "claimed_subject": "evil\x1b]0;owned\x07",
            "token_fingerprint": "f" * 64,
        }
    },
    {"revocation": {"grant_id": "ab" * 16, "connection": "orders-replica", "actor": "agent-7"}},
]


def write_log(path: Path) -> Path:
    store = SqliteStore.open(path)
    prev = bytes(32)
    log: list[StoredRecord] = []
    try:
        for index, event in enumerate(EVENTS):
            caller = "verifier" if "token_rejected" in event else "policy"
            item = seal(
                index=index,
                time=format_time(T0 + index),
                caller=f"spiffe://jitgate/{caller}",
                event=event,
                prev_hash=prev,
            )
            log.append(item)
            store.append([item], checkpoint_for(log))
            prev = item.record_hash
    finally:
        store.close()
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "audit.db")


def tamper(path: Path) -> None:
    with sqlite3.connect(path, isolation_level=None) as other:
        other.execute("DROP TRIGGER records_no_delete")
        other.execute("DELETE FROM records WHERE idx = 1")


def run(*argv: str) -> int:
    top = argparse.ArgumentParser(prog="jitgate")
    audit_cli.register(top.add_subparsers(dest="verb", required=True))
    args = top.parse_args(argv)
    code: int = args.func(args)
    return code


def test_verify_intact(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "verify", str(log), "--key", VKEY) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4/4 checkpoints valid, 4/4 records valid"
    assert out[1] == "note: 3 consistency proofs between successive checkpoints hold"
    store = SqliteStore.open(log, read_only=True)
    try:
        latest = store.latest_checkpoint()
        assert latest is not None
        assert out[2] == f"log {ORIGIN} verified up to checkpoint 4, root {latest.root.hex()}"
    finally:
        store.close()


def test_verify_broken(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tamper(log)
    assert run("audit", "verify", str(log), "--key", VKEY) == Failure.GAP
    out = capsys.readouterr().out
    assert "FAILED: gap: record 1 is missing" in out


def test_verify_needs_a_key(log: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run("audit", "verify", str(log))
    assert caught.value.code == 2


def test_verify_a_bad_key(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "verify", str(log), "--key", "nonsense+123+abc") == 2
    assert "--key" in capsys.readouterr().err


def test_verify_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "verify", str(tmp_path / "missing.db"), "--key", VKEY) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "missing.db: no such bundle or file" in captured.err


def test_verify_not_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"junk" * 1000)
    assert run("audit", "verify", str(junk), "--key", VKEY) == 2
    assert "cannot read" in capsys.readouterr().err


def test_verify_a_folder_that_is_not_a_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("audit", "verify", str(tmp_path), "--key", VKEY) == 2
    assert "cannot read" in capsys.readouterr().err


def test_show(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "show", str(log)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "#0 2025-01-02T03:04:05.000000Z spiffe://jitgate/policy decision: ALLOW agent-7 ->"
        f" orders-replica (ALLOWED) grant {'ab' * 16} until 2025-01-02T03:09:05Z"
    )
    assert lines[1].endswith("decision: DENY agent-7 -> billing-primary (NO_BINDING)")
    assert "token rejected (audience) claimed sub evil\\x1b]0;owned\\x07" in lines[2]
    assert "\x1b" not in "".join(lines)  # no record can drive the terminal
    assert lines[3].endswith(
        f"revocation: grant {'ab' * 16} (orders-replica) of - revoked by agent-7"
    )
    assert len(lines) == 4


def test_show_from(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "show", str(log), "--from", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["#3"]


def test_show_json(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "show", str(log), "--json") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["event"] for r in records] == EVENTS
    assert records[0]["prev"] == "0" * 64
    assert records[1]["prev"] == records[0]["hash"]
    assert records[2]["caller"] == "spiffe://jitgate/verifier"


def test_show_an_unreadable_record(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(log, isolation_level=None) as other:
        other.execute("DROP TRIGGER records_no_update")
        other.execute("UPDATE records SET canonical = x'00' WHERE idx = 2")
    assert run("audit", "show", str(log)) == 0
    assert "#2 unreadable record: not UTF-8 JSON" in capsys.readouterr().out


def test_show_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("audit", "show", str(tmp_path / "missing.db")) == 2
    assert "no such file" in capsys.readouterr().err


def test_show_rejects_a_negative_index(log: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run("audit", "show", str(log), "--from", "-1")
    assert caught.value.code == 2


@pytest.mark.parametrize(("broken", "code"), [(False, 0), (True, Failure.GAP)])
def test_the_jitgate_command(log: Path, broken: bool, code: int) -> None:
    if broken:
        tamper(log)
    done = subprocess.run(
        [sys.executable, "-m", "jitgate", "audit", "verify", str(log), "--key", VKEY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert ("FAILED: gap" in done.stdout) is broken


def test_the_jitgate_command_on_a_missing_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jitgate",
            "audit",
            "verify",
            str(tmp_path / "missing.db"),
            "--key",
            VKEY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "no such bundle or file" in done.stderr
