"""`jitgate serve NAME`: run one service in the foreground, configured from JITGATE_*."""

from __future__ import annotations

import argparse
import asyncio
import importlib
from typing import Any

from jitgate.common import logs
from jitgate.common.config import Env

SERVICES = ("audit", "verifier", "policy", "issuer", "proxy")


def register(verbs: Any) -> None:
    """Add the serve verb."""
    cmd = verbs.add_parser("serve", help="run one service (configured by JITGATE_* variables)")
    cmd.add_argument("service", choices=SERVICES)
    cmd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Configure logging, then run the service until SIGTERM or SIGINT."""
    env = Env()
    logs.configure(
        args.service,
        level=env.string("JITGATE_LOG_LEVEL", "INFO"),
        json_lines=env.string("JITGATE_LOG_FORMAT", "text") == "json",
    )
    module = importlib.import_module(f"jitgate.{args.service}.main")
    asyncio.run(module.serve(env))
    return 0
