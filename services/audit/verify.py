"""Offline verification of an exported log: signed checkpoints, Merkle roots, order, chain.

Trusts nothing but the checkpoint key. Each failure has a kind, and the kind
has its own exit code, so a script can tell a forged signature from a deleted
record from a log that forked.
"""

from __future__ import annotations

import enum
import hmac
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from jitgate.audit.checkpoint import (
    BadSignature,
    Checkpoint,
    MalformedNote,
    NoteVerifier,
    UnknownKey,
    open_signed,
)
from jitgate.audit.merkle import Tree, check_consistency, leaf_hash
from jitgate.audit.record import GENESIS, record_hash


class Failure(enum.IntEnum):
    """What is wrong with a log; the value is the exit code of `jitgate audit verify`."""

    UNREADABLE = 2
    BAD_SIGNATURE = 3
    ROOT_MISMATCH = 4
    GAP = 5
    REORDER = 6
    FORK = 7
    TRUNCATED = 8
    MALFORMED = 9


PRECEDENCE = (
    Failure.UNREADABLE,
    Failure.BAD_SIGNATURE,
    Failure.MALFORMED,
    Failure.FORK,
    Failure.GAP,
    Failure.REORDER,
    Failure.TRUNCATED,
    Failure.ROOT_MISMATCH,
)
"""Which failure names the log when several are found: the most specific cause first.

A deleted record also breaks the roots after it; the gap is what happened."""


@dataclass(kw_only=True)
class Report:
    """The outcome: counts for the summary line, and every kind of failure found."""

    checkpoints: int = 0
    checkpoints_valid: int = 0
    records: int = 0
    records_valid: int = 0
    largest: Checkpoint | None = None
    found: dict[Failure, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every checkpoint and every record verified."""
        return not self.found

    @property
    def failure(self) -> Failure | None:
        """The failure that names what is wrong (see PRECEDENCE), if any."""
        return next((kind for kind in PRECEDENCE if kind in self.found), None)

    @property
    def detail(self) -> str:
        """What was found for that failure."""
        failure = self.failure
        return "" if failure is None else self.found[failure]

    def fail(self, failure: Failure, detail: str) -> None:
        """Record a failure of this kind; the first detail of each kind is kept."""
        self.found.setdefault(failure, detail)

    def summary(self) -> str:
        """One line: `5/5 checkpoints valid, 1200/1200 records valid`."""
        return (
            f"{self.checkpoints_valid}/{self.checkpoints} checkpoints valid,"
            f" {self.records_valid}/{self.records} records valid"
        )


@dataclass(frozen=True, kw_only=True)
class _Fields:
    index: int
    time: str
    prev: bytes


_TAIL = re.compile(
    rb',"index":(0|[1-9][0-9]{0,18}),"prev":"([0-9a-f]{64})","time":"([0-9:.TZ-]{27})","v":1}'
)
_DECODE = json.JSONDecoder().decode


def _fields(canonical: bytes) -> _Fields:
    """Return what ordering needs from a record, or raise ValueError.

    Canonical JSON sorts its keys, so a record ends with index, prev, time and
    v: read them there, without parsing the event (half the cost of verifying
    a large log). Nothing here needs to prove the rest of the bytes: the leaf
    hash covers them exactly, so any other record, or encoding of one, already
    fails its signed root. A record of another shape is parsed in full.
    """
    tail = _TAIL.fullmatch(canonical, max(canonical.rfind(b',"index":'), 0))
    if tail is not None and canonical.startswith(b'{"caller":'):
        index, prev, time = tail.groups()
        return _Fields(index=int(index), time=time.decode(), prev=bytes.fromhex(prev.decode()))
    body = _DECODE(canonical.decode("utf-8"))
    if not isinstance(body, dict):
        raise ValueError("a record is a JSON object")
    index, time, prev = body.get("index"), body.get("time"), body.get("prev")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError("index is not a non-negative integer")
    if not isinstance(time, str) or not isinstance(prev, str) or len(prev) != 64:
        raise ValueError("time or prev is missing or malformed")
    return _Fields(index=index, time=time, prev=bytes.fromhex(prev))


def _checkpoints(
    notes: Iterable[str], verifiers: Iterable[NoteVerifier], origin: str, report: Report
) -> dict[int, Checkpoint]:
    """Open every note; return checkpoints by size, recording the first failure."""
    keys = tuple(verifiers)
    by_size: dict[int, Checkpoint] = {}
    for position, note in enumerate(notes):
        report.checkpoints += 1
        try:
            signed = open_signed(note, keys)
        except (BadSignature, UnknownKey) as exc:
            report.fail(Failure.BAD_SIGNATURE, f"checkpoint #{position}: {exc}")
            continue
        except MalformedNote as exc:
            report.fail(Failure.MALFORMED, f"checkpoint #{position}: {exc}")
            continue
        if signed.origin != origin:
            report.fail(
                Failure.BAD_SIGNATURE,
                f"checkpoint #{position} is for log {signed.origin!r}, not {origin!r}",
            )
            continue
        seen = by_size.get(signed.size)
        if seen is not None and seen.root != signed.root:
            # Two signed, different trees of one size: the log showed different
            # histories to different readers (a split view).
            report.fail(Failure.FORK, f"two checkpoints of size {signed.size} with different roots")
            continue
        by_size[signed.size] = signed
        report.checkpoints_valid += 1
    return by_size


def verify(
    records: Iterable[bytes],
    notes: Iterable[str],
    verifiers: Iterable[NoteVerifier],
    *,
    origin: str,
) -> Report:
    """Verify records (canonical bytes, in order) against signed checkpoint notes."""
    report = Report()
    by_size = _checkpoints(notes, verifiers, origin, report)
    sizes = sorted(by_size)
    tree = Tree()
    prev_hash, last_time = GENESIS, ""
    broken_chain: int | None = None
    pending = iter(sizes)
    due = next(pending, None)
    while due == 0:  # the empty tree needs no records
        _check_root(report, tree, by_size[0])
        due = next(pending, None)
    seen = bytearray()  # seen[i] = 1 once a record says it is index i
    out_of_place: int | None = None
    for canonical in records:
        report.records += 1
        position = tree.size
        try:
            fields = _fields(canonical)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            report.fail(Failure.MALFORMED, f"record at position {position}: {exc}")
            fields = None
        if fields is not None:
            valid = True
            # A bitmap of indices seen, grown only near where records are: a
            # forged index of 2**60 must not make the verifier allocate it.
            if fields.index <= 2 * position + 1_000_000:
                if fields.index >= len(seen):
                    seen.extend(bytes(max(fields.index + 1 - len(seen), len(seen))))
                if seen[fields.index]:
                    report.fail(Failure.ROOT_MISMATCH, f"record {fields.index} appears twice")
                seen[fields.index] = 1
            if fields.index != position:
                valid = False
                if out_of_place is None:
                    out_of_place = position
            elif fields.time < last_time:
                valid = False
                report.fail(Failure.REORDER, f"record {position} is older than the one before")
            if not hmac.compare_digest(fields.prev, prev_hash):
                valid = False
                if broken_chain is None:
                    broken_chain = position
            report.records_valid += valid
            last_time = max(last_time, fields.time)
        prev_hash = record_hash(canonical)
        tree.append(leaf_hash(canonical))
        while due is not None and due == tree.size:
            _check_root(report, tree, by_size[due], broken_chain)
            due = next(pending, None)
    if out_of_place is not None:
        # Tell a record taken out (its index never appears) from records moved.
        count = tree.size
        missing = next((i for i in range(count) if i >= len(seen) or not seen[i]), None)
        if missing is not None:
            report.fail(Failure.GAP, f"record {missing} is missing")
        else:
            report.fail(Failure.REORDER, f"the record at position {out_of_place} is out of order")
    if due is not None:
        report.fail(
            Failure.TRUNCATED,
            f"a checkpoint covers {sizes[-1]} records but only {tree.size} are here",
        )
    _check_consistency(report, tree, by_size, sizes)
    if sizes:
        report.largest = by_size[sizes[-1]]
    if sizes and sizes[-1] < tree.size:
        report.notes.append(f"{tree.size - sizes[-1]} records after the last checkpoint")
    if broken_chain is not None:
        report.fail(
            Failure.ROOT_MISMATCH, f"record {broken_chain} does not link to its predecessor"
        )
    return report


def _check_root(
    report: Report, tree: Tree, signed: Checkpoint, broken_chain: int | None = None
) -> None:
    if tree.root() != signed.root:
        where = f" (the hash chain breaks at record {broken_chain})" if broken_chain else ""
        report.fail(
            Failure.ROOT_MISMATCH,
            f"the first {signed.size} records do not hash to the signed root{where}",
        )


def _check_consistency(
    report: Report, tree: Tree, by_size: dict[int, Checkpoint], sizes: list[int]
) -> None:
    # RFC 9162 section 2.1.4: each checkpoint's tree is a prefix of the next
    # one's. Recomputing every root from one record sequence implies it; the
    # proofs make the claim explicit, checked against the signed roots only.
    # Proofs from records that failed a root prove nothing about the log.
    if Failure.ROOT_MISMATCH in report.found:
        return
    covered = [s for s in sizes if 0 < s <= tree.size]
    checked = 0
    for old, new in itertools.pairwise(covered):
        try:
            proof = tree.consistency_proof(old, new)
            check_consistency(old, new, by_size[old].root, by_size[new].root, proof)
        except ValueError as exc:
            report.fail(
                Failure.FORK, f"checkpoint {old} is not a prefix of checkpoint {new}: {exc}"
            )
        else:
            checked += 1
    if checked:
        report.notes.append(f"{checked} consistency proofs between successive checkpoints hold")
