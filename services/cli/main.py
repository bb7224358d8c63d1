"""Entry point of the `jitgate` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from jitgate import __version__
from jitgate.common.errors import ConfigError
from jitgate.devstack import children

# Each module has register(subparsers), which adds its verb and sets `func`
# (args -> exit code) on the parser it adds.
VERBS = ("serve", "pki", "devidp", "up", "demo", "grant", "audit", "policy", "keys")


def parser() -> argparse.ArgumentParser:
    """Return the parser for every verb."""
    top = argparse.ArgumentParser(
        prog="jitgate", description="Just-in-time, least-scope access for AI agents."
    )
    top.add_argument("--version", action="version", version=f"jitgate {__version__}")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"jitgate.cli.{verb}").register(verbs)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Run one verb and exit with its code; configuration errors exit 2 with their message."""
    children.follow_parent()
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"jitgate: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
