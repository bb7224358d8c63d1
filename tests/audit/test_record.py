"""Canonical record bytes: known-answer vectors, round trips, and each rejection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jitgate.audit import record

VECTORS = json.loads((Path(__file__).parent / "record_vectors.json").read_text("utf-8"))
ZERO = "0" * 64


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "index": 0,
        "time": "2025-01-02T03:04:05.678901Z",
        "caller": "spiffe://jitgate/policy",
        "event": {"decision": {"allowed": True}},
        "prev": ZERO,
    }
    body.update(changes)
    return body


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("vector", VECTORS, ids=[v["comment"][:8] for v in VECTORS])
def test_known_answer(vector: dict[str, Any]) -> None:
    assert record.format_time(vector["seconds"]) == vector["time"]
    canonical = record.canonical_bytes(
        index=vector["index"],
        time=vector["time"],
        caller=vector["caller"],
        event=vector["event"],
        prev_hash=bytes.fromhex(vector["prev"]),
    )
    assert canonical == vector["canonical"].encode("utf-8")
    assert record.record_hash(canonical).hex() == vector["hash"]


def test_vectors_chain() -> None:
    assert VECTORS[0]["prev"] == ZERO
    assert VECTORS[1]["prev"] == VECTORS[0]["hash"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["comment"][:8] for v in VECTORS])
def test_seal_and_parse(vector: dict[str, Any]) -> None:
    sealed = record.seal(
        index=vector["index"],
        time=vector["time"],
        caller=vector["caller"],
        event=vector["event"],
        prev_hash=bytes.fromhex(vector["prev"]),
    )
    assert sealed.record_hash.hex() == vector["hash"]
    assert sealed.kind == next(iter(vector["event"]))
    body = record.parse(sealed.canonical)
    assert body.index == vector["index"]
    assert body.time == vector["time"]
    assert body.caller == vector["caller"]
    assert body.event == vector["event"]
    assert body.prev_hash.hex() == vector["prev"]


def test_time_pads_the_year_and_rounds_to_microseconds() -> None:
    assert record.format_time(-32_000_000_000) == "0955-12-17T15:06:40.000000Z"
    assert record.format_time(1.9999996) == "1970-01-01T00:00:02.000000Z"


_json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text()
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    index=st.integers(0, 2**63 - 1),
    caller=st.text(),
    kind=st.text(min_size=1),
    payload=_json,
    prev=st.binary(min_size=32, max_size=32),
    seconds=st.floats(0, 253402300799, allow_nan=False),
)
def test_round_trip(
    index: int, caller: str, kind: str, payload: Any, prev: bytes, seconds: float
) -> None:
    time = record.format_time(seconds)
    sealed = record.seal(
        index=index, time=time, caller=caller, event={kind: payload}, prev_hash=prev
    )
    body = record.parse(sealed.canonical)
    assert (body.index, body.time, body.caller, body.prev_hash) == (index, time, caller, prev)
    assert body.event == {kind: payload}


# Each rejection of canonical_bytes (caller mistakes: ValueError).


def _canonical(**changes: Any) -> bytes:
    args: dict[str, Any] = {
        "index": 0,
        "time": "2025-01-02T03:04:05.678901Z",
        "caller": "spiffe://jitgate/policy",
        "event": {"decision": {}},
        "prev_hash": bytes(32),
    }
    args.update(changes)
    return record.canonical_bytes(**args)


def test_encode_accepts_the_baseline() -> None:
    assert record.parse(_canonical()).kind == "decision"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"index": -1}, "index"),
        ({"prev_hash": bytes(31)}, "prev_hash"),
        ({"time": "2025-01-02T03:04:05Z"}, "time"),
        ({"time": "2025-01-02 03:04:05.678901Z"}, "time"),
        ({"event": {}}, "exactly one kind"),
        ({"event": {"decision": {}, "revocation": {}}}, "exactly one kind"),
        ({"event": {"": {}}}, "non-empty"),
        ({"event": {"decision": {"ttl": 1.5}}}, "float"),
        ({"event": {"decision": {"x": b"bytes"}}}, "bytes"),
        ({"event": {"decision": {1: "key"}}}, "keys must be strings"),
        ({"event": {"decision": "\ud800"}}, "Unicode"),
    ],
)
def test_encode_rejects(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _canonical(**changes)


# Each rejection of parse (bytes from disk: ValueError naming the fault).


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "UTF-8"),
        (b"{not json", "JSON"),
        (b"[1,2]", "exactly the keys"),
        (_encode({k: v for k, v in _body().items() if k != "prev"}), "exactly the keys"),
        (_encode(_body(extra=1)), "exactly the keys"),
        (_encode(_body(v=2)), "version"),
        (_encode(_body(v=True)), "version"),
        (_encode(_body(index=-1)), "index"),
        (_encode(_body(index=True)), "index"),
        (_encode(_body(index="0")), "index"),
        (_encode(_body(time=5)), "strings"),
        (_encode(_body(event=[])), "object"),
        (_encode(_body(prev=ZERO.upper().replace("0", "A"))), "prev"),
        (_encode(_body(prev="00")), "prev"),
        (_encode(_body(time="yesterday")), "time"),
        (_encode(_body(event={"a": 1, "b": 2})), "exactly one kind"),
        (_encode(_body(event={"decision": 1.0})), "float"),
        (_encode(_body()).replace(b":", b": ", 1), "canonical form"),
        (_encode(_body()) + b" ", "canonical form"),
        (_encode(_body()).replace(b'{"caller"', b'{"index":7,"caller"'), "canonical form"),
        (b'{"v":1' + b',"x":[' * 100_000, "JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_parse_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record.parse(data)


def test_parse_accepts_the_baseline() -> None:
    assert record.parse(_encode(_body())).event == {"decision": {"allowed": True}}


@pytest.mark.parametrize(
    "text", ["2025-01-02T03:04:05.678901+00:00", "2025-13-02T03:04:05.000000Z"]
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"time|month"):
        record.parse_time(text)
