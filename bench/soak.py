"""A steady RequestGrant load for minutes: errors, latency over time, every process's memory.

Run: `make bench-soak` (or `.venv/bin/python bench/soak.py [MINUTES] [RATE]`; the
defaults are 10 minutes at 200 grants/s). The real stack, an open-loop load
(latency from each request's scheduled time), one table row per minute, and
the RSS of each process at the start and the end of the load.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from grants import (  # bench/grants.py's open-loop generator (run from bench/)
    Run,
    issuer_channel,
    offer,
    request_grant,
)

from jitgate.devstack.stack import Stack


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def processes(stack: Stack) -> dict[str, int]:
    """Every process of the stack by name: services, Redis, the dev IdP, PostgreSQL."""
    pids = {name: process.pid for name, process in stack.processes.items()}
    if stack.redis is not None and stack.redis.process is not None:
        pids["redis"] = stack.redis.process.pid
    server = stack.postgres.server if stack.postgres is not None else None
    if server is not None and server.process is not None:
        pids["postgres"] = server.process.pid
    return pids


async def soak(stack: Stack, minutes: int, rate: float) -> list[Run]:
    """Offer rate grants/s for minutes; one Run per minute."""
    channel = issuer_channel(stack)
    runs = []
    token, fetched = stack.token("deploy-bot"), time.monotonic()
    for minute in range(minutes):
        if time.monotonic() - fetched > 1800:  # the dev IdP's tokens live an hour
            token, fetched = stack.token("deploy-bot"), time.monotonic()
        run = await offer(request_grant(channel, token), rate, 60)
        runs.append(run)
        print(
            f"minute {minute + 1}: {run.rate:.0f}/s, p99 {run.percentile(99):.1f} ms,"
            f" errors {run.errors or 0}",
            file=sys.stderr,
        )
    await channel.close()
    return runs


def main(minutes: int, rate: float) -> None:
    """Start the stack, warm it, soak it, print the tables."""
    with tempfile.TemporaryDirectory(prefix="jitgate-soak-") as name, Stack(Path(name)) as stack:
        warm = asyncio.run(soak_warm(stack, rate))
        pids = processes(stack)
        before = {name: rss_kib(pid) for name, pid in pids.items()}
        runs = asyncio.run(soak(stack, minutes, rate))
        after = {name: rss_kib(pid) for name, pid in pids.items()}
    print(
        f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · {minutes} min at {rate:.0f} grants/s "
        f"(after {warm} warm-up grants)\n"
    )
    print("| minute | grants/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for minute, run in enumerate(runs, 1):
        print(
            f"| {minute} | {run.rate:.0f} | {run.percentile(50):.1f} | {run.percentile(90):.1f}"
            f" | {run.percentile(99):.1f} | {max(run.latencies, default=0):.1f}"
            f" | {sum(run.errors.values())} |"
        )
    total = sum(len(run.latencies) for run in runs)
    errors = sum(sum(run.errors.values()) for run in runs)
    print(f"\n{total:,} grants, {errors} errors\n")
    print("| process | RSS at start MiB | at end MiB | growth |")
    print("|---|---|---|---|")
    for name in pids:
        growth = (after[name] - before[name]) / before[name] if before[name] else 0.0
        print(f"| {name} | {before[name] / 1024:.1f} | {after[name] / 1024:.1f} | {growth:+.1%} |")


async def soak_warm(stack: Stack, rate: float) -> int:
    """Two minutes at rate first: a grant's records live 2 min, so Redis holds its steady set."""
    runs = await soak(stack, 2, rate)
    return sum(len(run.latencies) for run in runs)


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 10,
        float(sys.argv[2]) if len(sys.argv) > 2 else 200.0,
    )
