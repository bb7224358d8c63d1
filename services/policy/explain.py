"""`jitgate policy explain`: which group reaches which connection, and how a change moves that.

A row is one binding as decide applies it: rows keep file order, and when an
identity holds several groups bound to one connection, the first row decides.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from jitgate.policy.model import Policy

Value = int | str | bool | None | tuple[str, ...]
COLUMNS = (
    "GROUP",
    "CONNECTION",
    "KIND",
    "ENVIRONMENT",
    "ACCESS",
    "NAMESPACE",
    "MAX TTL",
    "CONDITIONS",
)


@dataclass(frozen=True, kw_only=True)
class Reach:
    """Members of group may have connection for up to max_ttl seconds, on conditions."""

    group: str
    connection: str
    kind: str
    environment: str
    read_only: bool
    namespace: str
    max_ttl: int
    require_reason: bool
    max_concurrent: int | None
    binding: str
    """The binding's path in the file, e.g. bindings[2]."""


@dataclass(frozen=True)
class Aspect:
    """One property of a row that differs between two policies."""

    field: str
    old: Value
    new: Value


@dataclass(frozen=True, kw_only=True)
class Change:
    """What differs for one group and connection; group is "" for the connection as a whole."""

    group: str
    connection: str
    aspects: tuple[Aspect, ...]


@dataclass(frozen=True, kw_only=True)
class ReachDiff:
    """How reach moves from one policy to another."""

    added: tuple[Reach, ...] = ()
    removed: tuple[Reach, ...] = ()
    widened: tuple[Change, ...] = ()
    narrowed: tuple[Change, ...] = ()
    changed: tuple[Change, ...] = ()
    """Neither wider nor narrower: an environment tag, the order of groups on a connection."""

    @property
    def widens(self) -> bool:
        """Whether anyone may reach something, or reach it on looser terms, than before."""
        return bool(self.added or self.widened)


def reach(
    policy: Policy, *, group: str | None = None, connection: str | None = None
) -> list[Reach]:
    """Return one row per binding decide can apply, in file order, optionally filtered."""
    rows: list[Reach] = []
    seen: set[tuple[str, str]] = set()
    for binding in policy.bindings:
        target = policy.connections.get(binding.connection)
        key = (binding.group, binding.connection)
        if target is None or key in seen:
            continue  # lint errors: no connection, or a binding decide never reaches
        seen.add(key)
        if group not in (None, binding.group) or connection not in (None, binding.connection):
            continue
        rows.append(
            Reach(
                group=binding.group,
                connection=target.name,
                kind=target.kind,
                environment=target.environment,
                read_only=target.read_only,
                namespace=target.namespace,
                max_ttl=binding.max_ttl,
                require_reason=binding.require_reason,
                max_concurrent=binding.max_concurrent,
                binding=binding.path,
            )
        )
    return rows


def escape(text: str) -> str:
    """Return text with every non-printable character (escapes, bidi controls) spelled out."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def duration(seconds: int) -> str:
    """Return seconds as a short duration: 300 -> 5m, 5400 -> 1h30m."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts) or "0s"


def conditions(row: Reach) -> str:
    """Return the conditions on a row in words, "-" when there are none."""
    said = ["reason required"] if row.require_reason else []
    if row.max_concurrent is not None:
        said.append(f"max {row.max_concurrent} live per subject")
    return ", ".join(said) or "-"


def render_table(rows: Sequence[Reach]) -> str:
    """Return rows as aligned plain-text columns, with a note when row order decides."""
    if not rows:
        return "no group reaches any connection\n"
    cells = [COLUMNS] + [
        (
            r.group,
            r.connection,
            r.kind,
            r.environment or "-",
            "read-only" if r.read_only else "read-write",
            r.namespace or "-",
            duration(r.max_ttl),
            conditions(r),
        )
        for r in rows
    ]
    text = _align([tuple(escape(c) for c in line) for line in cells])
    counts = Counter(r.connection for r in rows)
    shared = sorted(name for name, count in counts.items() if count > 1)
    if shared:
        text += "\n" + escape(
            f"Several groups reach {', '.join(shared)}: an identity in more than one"
            " gets the terms of the first row listed for it."
        )
        text += "\n"
    return text


def _width(text: str) -> int:
    wide = ("W", "F")
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in wide else 1
        for c in text
    )


def _align(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(_width(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        padded = [cell + " " * (widths[i] - _width(cell)) for i, cell in enumerate(line)]
        out.append("  ".join(padded).rstrip() + "\n")
    return "".join(out)


def diff(
    old: Policy, new: Policy, *, group: str | None = None, connection: str | None = None
) -> ReachDiff:
    """Return how reach moves from old to new, optionally for one group or connection."""
    before = {(r.group, r.connection): r for r in reach(old, group=group, connection=connection)}
    after = {(r.group, r.connection): r for r in reach(new, group=group, connection=connection)}
    widened: list[Change] = []
    narrowed: list[Change] = []
    changed: list[Change] = []
    for key, now in after.items():
        was = before.get(key)
        if was is None:
            continue
        wider, narrower, other = _compare(was, now)
        for found, into in ((wider, widened), (narrower, narrowed), (other, changed)):
            if found:
                into.append(Change(group=now.group, connection=now.connection, aspects=found))
    changed += _reordered(old, new, group=group, connection=connection)
    return ReachDiff(
        added=tuple(r for k, r in after.items() if k not in before),
        removed=tuple(r for k, r in before.items() if k not in after),
        widened=tuple(widened),
        narrowed=tuple(narrowed),
        changed=tuple(changed),
    )


def _compare(was: Reach, now: Reach) -> tuple[tuple[Aspect, ...], ...]:
    wider: list[Aspect] = []
    narrower: list[Aspect] = []
    other: list[Aspect] = []

    def sort(name: str, looser: bool, into_other: bool = False) -> None:
        old, new = getattr(was, name), getattr(now, name)
        if old != new:
            into = other if into_other else wider if looser else narrower
            into.append(Aspect(name, old, new))

    sort("kind", True)  # another kind of target is new reach, never less
    sort("namespace", True)
    sort("read_only", was.read_only and not now.read_only)
    sort("max_ttl", now.max_ttl > was.max_ttl)
    sort("require_reason", was.require_reason and not now.require_reason)
    sort("max_concurrent", _cap(now.max_concurrent) > _cap(was.max_concurrent))
    sort("environment", False, into_other=True)
    return tuple(wider), tuple(narrower), tuple(other)


def _cap(value: int | None) -> float:
    return float("inf") if value is None else value


def _reordered(
    old: Policy, new: Policy, *, group: str | None, connection: str | None
) -> list[Change]:
    # decide takes the first binding in file order whose group the identity
    # holds: swapping two groups on a connection changes the terms for members
    # of both, though no row changes.
    found = []
    for name in new.connections:
        if connection not in (None, name):
            continue
        was = [r.group for r in reach(old, connection=name)]
        now = [r.group for r in reach(new, connection=name)]
        common = set(was) & set(now)
        was, now = [g for g in was if g in common], [g for g in now if g in common]
        if was != now and group in (None, *common):
            found.append(
                Change(
                    group="", connection=name, aspects=(Aspect("order", tuple(was), tuple(now)),)
                )
            )
    return found


def _value(field: str, value: Value) -> str:
    if field == "max_ttl" and isinstance(value, int):
        return duration(value)
    if isinstance(value, tuple):
        return ", ".join(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) or '""'


def describe(row: Reach) -> str:
    """Return one row in words, e.g. "sre -> bastion-eu1 (ssh, production, read-write) ..."."""
    where = [row.kind, row.environment or "no environment"]
    where.append("read-only" if row.read_only else "read-write")
    if row.namespace:
        where.append(f"namespace {row.namespace}")
    terms = conditions(row)
    tail = "" if terms == "-" else f", {terms}"
    return (
        f"{row.group} -> {row.connection} ({', '.join(where)}) up to {duration(row.max_ttl)}{tail}"
    )


def _change(change: Change) -> str:
    who = f"{change.group} -> {change.connection}" if change.group else change.connection
    said = "; ".join(
        f"{a.field} {_value(a.field, a.old)} -> {_value(a.field, a.new)}" for a in change.aspects
    )
    return f"{who}: {said}"


def render_diff(found: ReachDiff) -> str:
    """Return the diff as one line per row, then a count of each kind."""
    lines = [f"added     {describe(r)}" for r in found.added]
    lines += [f"removed   {describe(r)}" for r in found.removed]
    lines += [f"widened   {_change(c)}" for c in found.widened]
    lines += [f"narrowed  {_change(c)}" for c in found.narrowed]
    lines += [f"changed   {_change(c)}" for c in found.changed]
    counts = ", ".join(
        f"{len(items)} {name}"
        for name, items in (
            ("added", found.added),
            ("removed", found.removed),
            ("widened", found.widened),
            ("narrowed", found.narrowed),
            ("changed", found.changed),
        )
    )
    lines.append(counts if lines else "no change in reach")
    return "".join(escape(line) + "\n" for line in lines)


def table_json(policy: Policy, rows: Iterable[Reach]) -> str:
    """Return the policy's version and ceiling and the rows as JSON, keys sorted."""
    return _dump(
        {
            "policy": {"version": policy.version, "ttl_ceiling": policy.ttl_ceiling},
            "reach": [asdict(r) for r in rows],
        }
    )


def diff_json(found: ReachDiff) -> str:
    """Return the diff as JSON, keys sorted; "widens" is true when reach was added or widened."""
    return _dump({**asdict(found), "widens": found.widens})


def _dump(value: Any) -> str:
    # ensure_ascii: every character outside ASCII, control ones included, is escaped.
    return json.dumps(value, sort_keys=True, ensure_ascii=True, indent=2) + "\n"
