"""`jitgate demo`: the whole grant path, start to finish, in one command."""

from __future__ import annotations

import argparse
from typing import Any


def register(verbs: Any) -> None:
    """Add the demo verb."""
    cmd = verbs.add_parser("demo", help="start everything and walk one agent through a grant")
    cmd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every step behaved as promised."""
    from jitgate.devstack import demo

    return demo.run()
