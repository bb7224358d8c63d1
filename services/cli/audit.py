"""`jitgate audit verify|show DB_PATH`: check and read an audit log offline, read-only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jitgate.audit.chain import verify_database
from jitgate.audit.record import StoredRecord, parse
from jitgate.audit.store import SqliteStore, StoreError, iter_records

EXIT_INTACT = 0
EXIT_BROKEN = 1
EXIT_UNREADABLE = 2


def register(verbs: Any) -> None:
    """Add the audit verb."""
    cmd = verbs.add_parser("audit", help="check and read an audit log file (read-only)")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = sub.add_parser(
        "verify", help="walk the hash chain: exit 0 intact, 1 broken, 2 missing or unreadable"
    )
    verify.add_argument("db", type=Path, metavar="DB_PATH")
    verify.set_defaults(func=run_verify)
    show = sub.add_parser("show", help="print the records of an audit log")
    show.add_argument("db", type=Path, metavar="DB_PATH")
    show.add_argument("--from", dest="from_index", type=_index, default=0, metavar="N")
    show.add_argument("--json", action="store_true", help="one JSON object per record and line")
    show.set_defaults(func=run_show)


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an index") from None
    if value < 0:
        raise argparse.ArgumentTypeError("an index is 0 or more")
    return value


def _open(path: Path) -> SqliteStore | None:
    if not path.is_file():
        print(f"jitgate audit: {path}: no such file", file=sys.stderr)
        return None
    try:
        return SqliteStore.open(path, read_only=True)
    except StoreError as exc:
        print(f"jitgate audit: cannot read {path}: {exc}", file=sys.stderr)
        return None


def run_verify(args: argparse.Namespace) -> int:
    """Print whether the chain is intact; the exit code says the same."""
    if not args.db.is_file():
        print(f"jitgate audit: {args.db}: no such file", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        report = verify_database(args.db)
    except StoreError as exc:
        print(f"jitgate audit: cannot read {args.db}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if report.intact:
        print(f"audit log intact: {report.count} records, head {report.head.hex()}")
        return EXIT_INTACT
    print(f"audit log broken at index {report.broken_at}: {_safe(report.reason)}")
    return EXIT_BROKEN


def run_show(args: argparse.Namespace) -> int:
    """Print records from --from on; this does not verify them (use verify)."""
    store = _open(args.db)
    if store is None:
        return EXIT_UNREADABLE
    try:
        for stored in iter_records(store, args.from_index):
            print(_as_json(stored) if args.json else _as_text(stored))
    except StoreError as exc:
        print(f"jitgate audit: cannot read {args.db}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except BrokenPipeError:
        # The reader (e.g. `head`) has gone; stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        store.close()
    return 0


def _safe(text: str) -> str:
    # Records carry what agents sent (a rejected token's claims): escape control
    # characters so no record can drive the operator's terminal.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _get(event: Mapping[str, Any], *path: str) -> str:
    value: Any = event
    for key in path:
        value = value.get(key, "") if isinstance(value, dict) else ""
    return str(value) if value not in ("", None) else "-"


def _summary(kind: str, event: Mapping[str, Any]) -> str:
    if kind == "decision":
        verdict = "ALLOW" if event.get("allowed") is True else "DENY"
        line = (
            f"{verdict} {_get(event, 'identity', 'subject')} -> {_get(event, 'connection')}"
            f" ({_get(event, 'reason_code')})"
        )
        if event.get("grant_id"):
            line += f" grant {_get(event, 'grant_id')} until {_get(event, 'expires_at')}"
        return line
    if kind == "token_rejected":
        return (
            f"token rejected ({_get(event, 'reason')}) claimed sub"
            f" {_get(event, 'claimed_subject')} iss {_get(event, 'claimed_issuer')}"
            f" sha256 {_get(event, 'token_fingerprint')[:16]}"
        )
    if kind == "revocation":
        return (
            f"grant {_get(event, 'grant_id')} ({_get(event, 'connection')}) of"
            f" {_get(event, 'subject')} revoked by {_get(event, 'actor')}"
        )
    return json.dumps(event, sort_keys=True)


def _as_text(stored: StoredRecord) -> str:
    try:
        body = parse(stored.canonical)
    except ValueError as exc:
        return f"#{stored.index} unreadable record: {_safe(str(exc))}"
    inner = body.event[body.kind]
    summary = _summary(body.kind, inner) if isinstance(inner, dict) else json.dumps(inner)
    return _safe(f"#{body.index} {body.time} {body.caller} {body.kind}: {summary}")


def _as_json(stored: StoredRecord) -> str:
    out: dict[str, Any] = {"index": stored.index, "hash": stored.record_hash.hex()}
    try:
        body = parse(stored.canonical)
    except ValueError as exc:
        out["error"] = str(exc)
    else:
        out.update(
            time=body.time,
            caller=body.caller,
            kind=body.kind,
            prev=body.prev_hash.hex(),
            event=body.event,
        )
    # ensure_ascii: every character outside ASCII, control ones included, is escaped.
    return json.dumps(out, sort_keys=True, ensure_ascii=True)
