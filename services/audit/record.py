"""The canonical bytes and hash of one audit record: pure functions, no clock, no I/O."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VERSION = 1
"""The record format version, the "v" of every record."""
GENESIS = bytes(32)
"""The prev hash of record 0: there is no previous record."""
HASH_BYTES = 32

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_KEYS = frozenset({"v", "index", "time", "caller", "event", "prev"})


@dataclass(frozen=True, kw_only=True)
class StoredRecord:
    """One record as the store holds it: the canonical bytes plus copies for queries.

    time, caller and kind repeat what the canonical bytes say so a store can
    be queried without parsing JSON; the chain check holds them to it.
    """

    index: int
    time: str
    caller: str
    kind: str
    canonical: bytes
    record_hash: bytes


@dataclass(frozen=True, kw_only=True)
class RecordBody:
    """The fields a record's canonical bytes carry."""

    index: int
    time: str
    caller: str
    event: Mapping[str, Any]
    prev_hash: bytes

    @property
    def kind(self) -> str:
        """The event's kind: its one top-level key."""
        return event_kind(self.event)


def format_time(seconds: float) -> str:
    """Return seconds since the epoch as YYYY-MM-DDTHH:MM:SS.ffffffZ in UTC."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    # isoformat pads the year to four digits, which strftime("%Y") does not.
    return moment.isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"


def parse_time(text: str) -> datetime.datetime:
    """Return the UTC datetime of a record time; ValueError if it is not in record form."""
    if not _TIME.fullmatch(text):
        raise ValueError(f"time {text!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return datetime.datetime.fromisoformat(text)


def event_kind(event: Mapping[str, Any]) -> str:
    """Return the kind of an event: the name of the one oneof member that is set."""
    if len(event) != 1:
        raise ValueError(f"an event has exactly one kind, this one has {len(event)}")
    (kind,) = event
    if not isinstance(kind, str) or not kind:
        raise ValueError("an event's kind must be a non-empty string")
    return kind


def _check_json(value: Any, path: str) -> None:
    # Only types whose JSON form is unique: with ASCII keys and integer numbers,
    # sorted-key compact JSON is the RFC 8785 (JCS) canonical form, so another
    # implementation can reproduce the bytes. Floats have no such agreement.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be strings")
            _check_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_json(item, f"{path}[{position}]")
    elif value is not None and not isinstance(value, str | int):  # bool is an int
        raise ValueError(f"{path}: {type(value).__name__} has no canonical JSON form")


def _dumps(body: Mapping[str, Any]) -> bytes:
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def canonical_bytes(
    *, index: int, time: str, caller: str, event: Mapping[str, Any], prev_hash: bytes
) -> bytes:
    """Return the canonical encoding of a record: the bytes that are hashed and stored."""
    if index < 0:
        raise ValueError("index must not be negative")
    if len(prev_hash) != HASH_BYTES:
        raise ValueError(f"prev_hash must be {HASH_BYTES} bytes")
    parse_time(time)
    event_kind(event)
    _check_json(event, "event")
    body = {
        "v": VERSION,
        "index": index,
        "time": time,
        "caller": caller,
        "event": event,
        "prev": prev_hash.hex(),
    }
    try:
        return _dumps(body)
    except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 form
        raise ValueError("event text is not valid Unicode") from exc


def record_hash(canonical: bytes) -> bytes:
    """Return SHA-256 of a record's canonical bytes."""
    return hashlib.sha256(canonical).digest()


def seal(
    *, index: int, time: str, caller: str, event: Mapping[str, Any], prev_hash: bytes
) -> StoredRecord:
    """Return the record that follows prev_hash at index, ready to store."""
    canonical = canonical_bytes(
        index=index, time=time, caller=caller, event=event, prev_hash=prev_hash
    )
    return StoredRecord(
        index=index,
        time=time,
        caller=caller,
        kind=event_kind(event),
        canonical=canonical,
        record_hash=record_hash(canonical),
    )


def parse(canonical: bytes) -> RecordBody:
    """Return the fields of canonical record bytes; ValueError names what is wrong.

    Bytes that decode but are not in canonical form are refused too: two
    encodings of one record would let a record be rewritten without changing
    what it says.
    """
    try:
        body = json.loads(canonical.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(body, dict) or set(body) != _KEYS:
        raise ValueError(f"a record is an object with exactly the keys {sorted(_KEYS)}")
    if body["v"] != VERSION or isinstance(body["v"], bool):
        raise ValueError(f"unknown record version {body['v']!r}")
    index, time, caller, event, prev = (
        body["index"],
        body["time"],
        body["caller"],
        body["event"],
        body["prev"],
    )
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError("index is not a non-negative integer")
    if not isinstance(time, str) or not isinstance(caller, str) or not isinstance(event, dict):
        raise ValueError("time and caller must be strings and event an object")
    if not isinstance(prev, str) or not _HEX_HASH.fullmatch(prev):
        raise ValueError("prev is not 64 lowercase hex digits")
    parsed = RecordBody(
        index=index, time=time, caller=caller, event=event, prev_hash=bytes.fromhex(prev)
    )
    try:
        again = canonical_bytes(
            index=index, time=time, caller=caller, event=event, prev_hash=parsed.prev_hash
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if again != canonical:
        raise ValueError("bytes are not in canonical form")
    return parsed
