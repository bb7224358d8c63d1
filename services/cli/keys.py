"""`jitgate keys init|rotate|list DIR`: the policy service's grant-signing key directory.

Exit codes: 0 done, 1 refused by the keys' state (a rotation already waiting,
nothing to activate, activating too early, a directory already made), 2 a
directory that is not a usable key directory, or bad usage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from jitgate.common import validate
from jitgate.common.clock import Clock, system_clock
from jitgate.policy import keyring, model
from jitgate.policy.keyring import Entry, RotationRefused, State, format_time

clock: Clock = system_clock
"""Where the commands read the time; tests replace it."""

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, None: 1}


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 60, 90s, 15m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def register(verbs: Any) -> None:
    """Add the keys verb."""
    cmd = verbs.add_parser(
        "keys",
        help="the policy service's grant-signing keys (JITGATE_POLICY_KEYS_DIR)",
        description="Create, rotate and list grant-signing keys; see docs/key-rotation.md.",
    )
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="create DIR with its first key, signing at once")
    init.add_argument("dir", type=Path)
    init.set_defaults(func=run_init)

    rotate = sub.add_parser(
        "rotate",
        help="add a new key, published before it signs; or activate it (--activate)",
        description="Add a new key as next: published at once, signing after --publish-ahead"
        " (or, with --hold, after `rotate --activate`). The key it replaces stays published"
        " until every grant it could have signed has expired. Retired keys are deleted.",
    )
    rotate.add_argument("dir", type=Path)
    when = rotate.add_mutually_exclusive_group()
    when.add_argument(
        "--hold",
        action="store_true",
        help="publish the new key but let it sign only on `rotate --activate`",
    )
    when.add_argument(
        "--activate",
        action="store_true",
        help="make the next key sign now, if published for at least --publish-ahead",
    )
    rotate.add_argument(
        "--publish-ahead",
        type=_duration,
        default=keyring.DEFAULT_PUBLISH_AHEAD,
        metavar="DURATION",
        help="how long a key is published before it may sign, longer than proxies wait"
        f" between key fetches (default {keyring.DEFAULT_PUBLISH_AHEAD:g}s)",
    )
    ceiling = rotate.add_mutually_exclusive_group()
    ceiling.add_argument(
        "--policy", type=Path, metavar="FILE", help="read the longest grant (ttl_ceiling) from it"
    )
    ceiling.add_argument(
        "--ttl-ceiling",
        type=_duration,
        metavar="DURATION",
        help=f"the longest grant (default {validate.MAX_TTL_SECONDS // 3600}h, the most any"
        " policy allows)",
    )
    rotate.add_argument(
        "--margin",
        type=_duration,
        default=keyring.DEFAULT_MARGIN,
        metavar="DURATION",
        help=f"kept past the last grant's expiry (default {keyring.DEFAULT_MARGIN:g}s)",
    )
    rotate.set_defaults(func=run_rotate)

    listing = sub.add_parser("list", help="show each key's kid, state and times")
    listing.add_argument("dir", type=Path)
    listing.add_argument("--json", action="store_true", help="one JSON object per key and line")
    listing.set_defaults(func=run_list)


def _refused(exc: RotationRefused) -> int:
    print(f"jitgate: {exc}", file=sys.stderr)
    return 1


def run_init(args: argparse.Namespace) -> int:
    """Create the directory and its first key."""
    try:
        entry = keyring.init(args.dir, clock=clock)
    except RotationRefused as exc:
        return _refused(exc)
    print(f"created {args.dir}: kid {entry.kid} signs from {format_time(entry.created_at)}")
    return 0


def _keep_for(args: argparse.Namespace) -> float:
    if args.policy is not None:
        ceiling = float(model.load(args.policy).ttl_ceiling)
    elif args.ttl_ceiling is not None:
        ceiling = args.ttl_ceiling
    else:
        ceiling = float(validate.MAX_TTL_SECONDS)
    return float(ceiling + args.margin)


def run_rotate(args: argparse.Namespace) -> int:
    """Add a next key, or activate the one waiting."""
    keep_for = _keep_for(args)
    try:
        if args.activate:
            done = keyring.activate(
                args.dir, keep_for=keep_for, publish_ahead=args.publish_ahead, clock=clock
            )
        else:
            done = keyring.rotate(
                args.dir,
                keep_for=keep_for,
                publish_ahead=None if args.hold else args.publish_ahead,
                clock=clock,
            )
    except RotationRefused as exc:
        return _refused(exc)
    added = done.added
    if args.activate:
        print(f"kid {added.kid} is active from {format_time(_time(added.activate_at))}")
    elif added.activate_at is None:
        print(
            f"added kid {added.kid}: published, not signing;"
            f" `jitgate keys rotate {args.dir} --activate` makes it sign"
            f" (from {format_time(added.created_at + args.publish_ahead)})"
        )
    else:
        print(f"added kid {added.kid}: published, signing from {format_time(added.activate_at)}")
    if done.replaced is not None:
        retire_at = _time(done.replaced.retire_at)
        print(f"kid {done.replaced.kid} stays published until {format_time(retire_at)}")
    for kid in done.removed:
        print(f"removed retired kid {kid}")
    return 0


def _time(value: float | None) -> float:
    assert value is not None
    return value


def _row(entry: Entry, state: State) -> dict[str, str | None]:
    def when(seconds: float | None) -> str | None:
        return None if seconds is None else format_time(seconds)

    return {
        "kid": entry.kid,
        "state": str(state),
        "created_at": when(entry.created_at),
        "activate_at": when(entry.activate_at),
        "retire_at": when(entry.retire_at),
    }


def run_list(args: argparse.Namespace) -> int:
    """Print each key's kid, state and times, as the manifest gives them."""
    # The policy service may publish a retiring key past its retire_at, until
    # its own longest grant has expired (docs/key-rotation.md).
    entries = keyring.read_manifest(args.dir)
    rows = [_row(s.entry, s.state) for s in keyring.timeline(entries, clock())]
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    header = ("KID", "STATE", "CREATED", "ACTIVATE AT", "RETIRE AT")
    table = [
        (
            str(row["kid"]),
            str(row["state"]),
            str(row["created_at"]),
            row["activate_at"] or "on --activate",
            row["retire_at"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *table)) for i in range(len(header))]
    for line in (header, *table):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0
