"""`jitgate serve NAME`: run one service in the foreground, configured from JITGATE_*."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
from typing import Any

from jitgate.common import logs, telemetry
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError

SERVICES = ("audit", "verifier", "policy", "issuer", "proxy")
LOOPS = ("uvloop", "asyncio")


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
    flush = telemetry.setup(args.service)
    try:
        if args.service == "proxy" and event_loop(env) == "uvloop":
            # The proxy relays every byte on its event loop; uvloop's TLS and socket
            # I/O in C carried about a third more pgbench TPS (bench/RESULTS.md).
            import uvloop

            uvloop.run(module.serve(env))
        else:
            asyncio.run(module.serve(env))
    finally:
        flush()
    return 0


def event_loop(env: Env) -> str:
    """JITGATE_EVENT_LOOP: uvloop where it is installed (the default), else asyncio."""
    default = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    chosen = env.string("JITGATE_EVENT_LOOP", default)
    if chosen not in LOOPS:
        raise ConfigError(f"JITGATE_EVENT_LOOP: {chosen!r} is not one of {', '.join(LOOPS)}")
    if chosen == "uvloop" and default != "uvloop":
        raise ConfigError("JITGATE_EVENT_LOOP=uvloop, but uvloop is not installed")
    return chosen
