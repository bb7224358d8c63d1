"""The export bundle: a folder an auditor can verify offline with nothing but a public key.

records.jsonl holds each record's canonical bytes, one per line, exactly the
bytes that were hashed (canonical JSON escapes every newline inside strings);
checkpoints.jsonl holds each signed checkpoint note as a JSON string, oldest
first; manifest.json says what the folder is. Nothing in the manifest is
trusted by the verifier: roots come only from signed notes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FORMAT = "jitgate-audit-bundle/1"
RECORDS = "records.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
MANIFEST = "manifest.json"
MAX_LINE_BYTES = 1024 * 1024
"""Far above any record (events are capped at 16 KiB); a longer line is refused, not read."""


class BundleError(Exception):
    """The folder is not a readable bundle."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What the exporter said about the bundle: informational only."""

    origin: str
    records: int
    checkpoints: int
    exported_at: str


def write(
    out: Path,
    *,
    origin: str,
    records: Iterable[bytes],
    notes: Iterable[str],
    exported_at: str,
) -> Manifest:
    """Write a bundle into out, a new or empty folder readable by its owner only."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    count = 0
    with _Private(out / RECORDS) as sink:
        for canonical in records:
            if b"\n" in canonical:
                raise BundleError(f"record {count} contains a newline: not canonical")
            sink.write(canonical + b"\n")
            count += 1
    written = 0
    with _Private(out / CHECKPOINTS) as sink:
        for note in notes:
            sink.write(json.dumps(note).encode() + b"\n")
            written += 1
    manifest = Manifest(origin=origin, records=count, checkpoints=written, exported_at=exported_at)
    body = {"format": FORMAT, **manifest.__dict__}
    with _Private(out / MANIFEST) as sink:
        sink.write(json.dumps(body, indent=2, sort_keys=True).encode() + b"\n")
    return manifest


class _Private:
    """A file created 0600 and fsynced on close: an export is evidence."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._out = os.fdopen(self._fd, "wb", buffering=1024 * 1024)

    def __enter__(self) -> _Private:
        return self

    def write(self, data: bytes) -> None:
        """Write data."""
        self._out.write(data)

    def __exit__(self, *exc: object) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()


def read_manifest(folder: Path) -> Manifest:
    """Return the manifest, or raise BundleError saying what is wrong."""
    try:
        body = json.loads((folder / MANIFEST).read_bytes())
    except OSError as exc:
        raise BundleError(f"{folder / MANIFEST}: {exc.strerror}") from exc
    except ValueError as exc:
        raise BundleError(f"{folder / MANIFEST}: not JSON") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise BundleError(f"{folder} is not a {FORMAT} bundle")
    try:
        return Manifest(
            origin=str(body["origin"]),
            records=int(body["records"]),
            checkpoints=int(body["checkpoints"]),
            exported_at=str(body["exported_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{folder / MANIFEST}: missing or malformed {exc}") from exc


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with path.open("rb") as source:
            while line := source.readline(MAX_LINE_BYTES + 1):
                if len(line) > MAX_LINE_BYTES:
                    raise BundleError(f"{path}: a line longer than {MAX_LINE_BYTES} bytes")
                yield line.removesuffix(b"\n")
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from exc


def read_records(folder: Path) -> Iterator[bytes]:
    """Yield each record's canonical bytes, in file order."""
    return _lines(folder / RECORDS)


def read_notes(folder: Path) -> Iterator[str]:
    """Yield each checkpoint's signed note, in file order."""
    for number, line in enumerate(_lines(folder / CHECKPOINTS)):
        try:
            note = json.loads(line)
        except ValueError as exc:
            raise BundleError(f"{folder / CHECKPOINTS} line {number + 1}: not JSON") from exc
        if not isinstance(note, str):
            raise BundleError(f"{folder / CHECKPOINTS} line {number + 1}: not a note")
        yield note
