"""`jitgate policy lint|explain`: check a policy file, show what it grants, diff two of them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jitgate.common.errors import ConfigError
from jitgate.policy import explain, model
from jitgate.policy.explain import escape
from jitgate.policy.lint import lint
from jitgate.policy.model import Policy

OK, ERRORS, UNREADABLE, WIDENS = 0, 1, 2, 3


def register(verbs: Any) -> None:
    """Add the policy verb."""
    cmd = verbs.add_parser("policy", help="lint a policy file, explain what it grants, diff two")
    sub = cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser(
        "lint",
        help="report errors and least-scope warnings in a policy file",
        description="Exit 0 when the policy has no errors (its warnings are printed), 1 when"
        " it has errors, 2 when the file cannot be read or the usage is wrong.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="one JSON document")
    check.add_argument(
        "--max-connections-per-group",
        type=_limit,
        default=3,
        metavar="N",
        help="warn when a group reaches more connections (default 3)",
    )
    check.add_argument(
        "--max-groups-per-connection",
        type=_limit,
        default=3,
        metavar="N",
        help="warn when more groups reach a connection (default 3)",
    )
    check.set_defaults(func=run_lint)
    show = sub.add_parser(
        "explain",
        help="show which group reaches which connection, or how a change moves that",
        description="Exit 0, 1 when a policy has errors, 2 when a file cannot be read or the"
        " usage is wrong, 3 with --fail-on-widen when the new policy adds or widens reach.",
    )
    show.add_argument("file", type=Path, nargs="?", metavar="FILE")
    show.add_argument(
        "--diff", type=Path, nargs=2, metavar=("OLD", "NEW"), help="compare two policy files"
    )
    show.add_argument("--group", help="only this group")
    show.add_argument("--connection", help="only this connection")
    show.add_argument("--json", action="store_true", help="one JSON document")
    show.add_argument(
        "--fail-on-widen",
        action="store_true",
        help="with --diff: exit 3 when reach is added or widened (for CI)",
    )
    show.set_defaults(func=run_explain)


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is 1 or more")
    return value


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        _say(f"cannot read {path}: {exc.strerror}")
        return None


def _say(message: str) -> None:
    print(escape(f"jitgate policy: {message}"), file=sys.stderr)


def run_lint(args: argparse.Namespace) -> int:
    """Print the findings; exit 1 if any is an error."""
    data = _read(args.file)
    if data is None:
        return UNREADABLE
    source = str(args.file)
    found = lint(
        data,
        source,
        max_connections_per_group=args.max_connections_per_group,
        max_groups_per_connection=args.max_groups_per_connection,
    )
    errors = sum(f.severity == "error" for f in found)
    warnings = len(found) - errors
    if args.json:
        document = {
            "source": source,
            "errors": errors,
            "warnings": warnings,
            "findings": [
                {"severity": f.severity, "code": f.code, "path": f.path, "message": f.message}
                for f in found
            ],
        }
        print(json.dumps(document, sort_keys=True, ensure_ascii=True, indent=2))
    else:
        for finding in found:
            print(escape(str(finding)))
        print(escape(f"{source}: {_plural(errors, 'error')}, {_plural(warnings, 'warning')}"))
    return ERRORS if errors else OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _load(path: Path) -> Policy | int:
    data = _read(path)
    if data is None:
        return UNREADABLE
    try:
        return model.parse(data, source=str(path))
    except ConfigError as exc:
        _say(f"not a usable policy: {exc} (see `jitgate policy lint {path}`)")
        return ERRORS


def run_explain(args: argparse.Namespace) -> int:
    """Print the reach of one policy, or the diff between two."""
    if (args.file is None) == (args.diff is None):
        _say("explain takes FILE, or --diff OLD NEW")
        return UNREADABLE
    if args.fail_on_widen and args.diff is None:
        _say("--fail-on-widen needs --diff OLD NEW")
        return UNREADABLE
    if args.diff is not None:
        return _explain_diff(args)
    policy = _load(args.file)
    if isinstance(policy, int):
        return policy
    rows = explain.reach(policy, group=args.group, connection=args.connection)
    if args.json:
        sys.stdout.write(explain.table_json(policy, rows))
    else:
        sys.stdout.write(explain.render_table(rows))
        print(
            f"\nttl_ceiling {explain.duration(policy.ttl_ceiling)}; a grant ends at MAX TTL,"
            " or sooner when the token that asked for it does."
        )
    return OK


def _explain_diff(args: argparse.Namespace) -> int:
    old, new = (_load(path) for path in args.diff)
    if isinstance(old, int):
        return old
    if isinstance(new, int):
        return new
    found = explain.diff(old, new, group=args.group, connection=args.connection)
    out = explain.diff_json(found) if args.json else explain.render_diff(found)
    sys.stdout.write(out)
    return WIDENS if args.fail_on_widen and found.widens else OK
