"""`jitgate audit export|verify|show`: take a log out, check it offline, read it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jitgate.audit import bundle, verify
from jitgate.audit.bundle import BundleError
from jitgate.audit.checkpoint import Checkpoint, CheckpointError, NoteVerifier, parse_verifier_key
from jitgate.audit.client import AuditClient
from jitgate.audit.pgstore import PostgresStore, describe
from jitgate.audit.record import StoredRecord, format_time, parse
from jitgate.audit.store import SqliteStore, StoreError, iter_checkpoints, iter_records
from jitgate.audit.verify import Failure
from jitgate.common import tls
from jitgate.common.config import Env
from jitgate.common.errors import JitgateError


def register(verbs: Any) -> None:
    """Add the audit verb."""
    cmd = verbs.add_parser("audit", help="export, verify and read the audit log")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser(
        "export",
        help="write the records and signed checkpoints to a bundle folder (auditor identity)",
    )
    export.add_argument("--out", type=Path, required=True, metavar="BUNDLE")
    source = export.add_mutually_exclusive_group()
    source.add_argument(
        "--audit", metavar="HOST:PORT", help="the audit service ($JITGATE_AUDIT_ADDR)"
    )
    source.add_argument("--db", type=Path, metavar="DB_PATH", help="a SQLite log file instead")
    export.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    export.set_defaults(func=run_export)
    verify = sub.add_parser(
        "verify",
        help="check a bundle or a SQLite log against its checkpoint key, offline",
        description="Exit 0 when every checkpoint and record verifies; otherwise "
        + ", ".join(f"{f.value} {f.name.lower().replace('_', ' ')}" for f in Failure)
        + ".",
    )
    verify.add_argument("target", type=Path, metavar="BUNDLE_OR_DB")
    verify.add_argument(
        "--key",
        required=True,
        help="the log's verifier key (name+hash+key), or a file of them, one a line",
    )
    verify.add_argument("--origin", help="the log's name in its checkpoints (default: the key's)")
    verify.set_defaults(func=run_verify)
    provision = sub.add_parser(
        "provision",
        help="create the audit schema in a PostgreSQL database and grant the service's roles",
    )
    provision.add_argument(
        "--admin-dsn", required=True, help="a connection as the tables' owner (not the writer)"
    )
    provision.add_argument("--writer-role", required=True, help="may INSERT and SELECT, no more")
    provision.add_argument("--reader-role", help="may SELECT only")
    provision.set_defaults(func=run_provision)
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


def _verifiers(spec: str) -> tuple[NoteVerifier, ...]:
    """Read --key: a verifier key string, or a file holding one or more (one a line)."""
    path = Path(spec)
    lines = path.read_text().split() if "+" not in spec and path.is_file() else [spec]
    return tuple(parse_verifier_key(line.strip()) for line in lines if line.strip())


def run_verify(args: argparse.Namespace) -> int:
    """Verify a bundle or a SQLite log; print the summary; exit with the failure's code."""
    try:
        verifiers = _verifiers(args.key)
    except (OSError, CheckpointError) as exc:
        print(f"jitgate audit: --key: {exc}", file=sys.stderr)
        return Failure.UNREADABLE
    if not verifiers:
        print("jitgate audit: --key: no verifier key found", file=sys.stderr)
        return Failure.UNREADABLE
    origin = args.origin or verifiers[0].name
    target: Path = args.target
    try:
        if target.is_dir():
            report = verify.verify(
                bundle.read_records(target), bundle.read_notes(target), verifiers, origin=origin
            )
        elif target.is_file():
            store = SqliteStore.open(target, read_only=True)
            try:
                report = verify.verify(
                    (r.canonical for r in iter_records(store)),
                    (c.note for c in iter_checkpoints(store)),
                    verifiers,
                    origin=origin,
                )
            finally:
                store.close()
        else:
            print(f"jitgate audit: {target}: no such bundle or file", file=sys.stderr)
            return Failure.UNREADABLE
    except (BundleError, StoreError) as exc:
        print(f"jitgate audit: cannot read {target}: {_safe(str(exc))}", file=sys.stderr)
        return Failure.UNREADABLE
    print(report.summary())
    for note in report.notes:
        print(f"note: {note}")
    if report.failure is None:
        if report.largest is not None:
            root = report.largest.root.hex()
            print(f"log {origin} verified up to checkpoint {report.largest.size}, root {root}")
        return 0
    for kind, detail in report.found.items():
        marker = "FAILED" if kind is report.failure else "also"
        print(f"{marker}: {kind.name.lower().replace('_', ' ')}: {_safe(detail)}")
    return int(report.failure)


def run_export(args: argparse.Namespace) -> int:
    """Write a bundle from the audit service (auditor identity) or from a SQLite file."""
    out: Path = args.out
    try:
        if args.db is not None:
            store = SqliteStore.open(args.db, read_only=True)
            try:
                latest = store.latest_checkpoint()
                origin = Checkpoint.parse(open_note_text(latest.note)).origin if latest else ""
                manifest = bundle.write(
                    out,
                    origin=origin,
                    records=(r.canonical for r in iter_records(store)),
                    notes=(c.note for c in iter_checkpoints(store)),
                    exported_at=format_time(time.time()),
                )
            finally:
                store.close()
        else:
            manifest = asyncio.run(_export_live(args, out))
    except (BundleError, StoreError, JitgateError, OSError, CheckpointError) as exc:
        print(f"jitgate audit export: {_safe(str(exc))}", file=sys.stderr)
        return 1
    print(
        f"exported {manifest.records} records and {manifest.checkpoints} checkpoints"
        f" of {manifest.origin or 'the log'} to {out}"
    )
    return 0


async def _export_live(args: argparse.Namespace, out: Path) -> bundle.Manifest:
    env = Env()
    address = args.audit or env.address("JITGATE_AUDIT_ADDR", "127.0.0.1:7446")
    credentials = tls.channel_credentials(env.tls())
    client = AuditClient(tls.secure_channel(address, credentials, server_name="audit"))
    try:
        # Checkpoints first: every record they cover is then already in the
        # log when the records are read, so the bundle verifies as a whole.
        checkpoints = await client.checkpoints(timeout=args.timeout)
        records = await client.read(timeout=args.timeout)
    finally:
        await client.close()
    origin = Checkpoint.parse(open_note_text(checkpoints[-1].note)).origin if checkpoints else ""
    return bundle.write(
        out,
        origin=origin,
        records=(r.canonical for r in records),
        notes=(c.note for c in checkpoints),
        exported_at=format_time(time.time()),
    )


def run_provision(args: argparse.Namespace) -> int:
    """Create (or re-grant) the PostgreSQL audit schema; idempotent."""
    try:
        PostgresStore.provision(
            args.admin_dsn, writer_role=args.writer_role, reader_role=args.reader_role
        )
    except StoreError as exc:
        print(f"jitgate audit provision: {_safe(str(exc))}", file=sys.stderr)
        return 1
    print(f"audit schema ready in {describe(args.admin_dsn)}; writer role {args.writer_role}")
    return 0


def open_note_text(note: str) -> str:
    """Return the text of a signed note without checking it: for naming, never trusting."""
    text, _, _ = note.rpartition("\n\n")
    return text + "\n"


def run_show(args: argparse.Namespace) -> int:
    """Print records from --from on; this does not verify them (use verify)."""
    store = _open(args.db)
    if store is None:
        return int(Failure.UNREADABLE)
    try:
        for stored in iter_records(store, args.from_index):
            print(_as_json(stored) if args.json else _as_text(stored))
    except StoreError as exc:
        print(f"jitgate audit: cannot read {args.db}: {exc}", file=sys.stderr)
        return int(Failure.UNREADABLE)
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
