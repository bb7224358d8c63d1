"""Latency of the grant path on the real stack, side by side with a one-hop floor.

Run: `make bench-grant-path` (or `.venv/bin/python bench/grant_path.py [N]`). One client,
sequential calls, every process real (issuer, verifier, policy, audit with
fsync, Redis, all mTLS). Throughput under load is a separate benchmark.
"""

from __future__ import annotations

import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jitgate.client import IssuerClient, Unavailable
from jitgate.devstack.stack import Stack


def _measure(call: Callable[[], object], n: int) -> list[float]:
    for _ in range(20):  # warm up channels, caches and the JIT-less interpreter alike
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _row(name: str, samples: list[float], floor: float) -> str:
    p50 = statistics.median(samples)
    p99 = statistics.quantiles(samples, n=100)[98]
    return f"| {name} | {p50:.2f} | {p99:.2f} | {p50 / floor:.1f}x |"


def main(n: int) -> None:
    """Start the stack, measure, print a Markdown table."""
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as tmp, Stack(Path(tmp)) as stack:
        token = stack.token("deploy-bot")
        channel = grpc.secure_channel(
            stack.address("issuer"), grpc.ssl_channel_credentials(stack.pki.ca.read_bytes())
        )
        health = health_pb2_grpc.HealthStub(channel)
        agent = IssuerClient(stack.address("issuer"), token=token, ca_file=stack.pki.ca)
        floor = _measure(lambda: health.Check(health_pb2.HealthCheckRequest()), n)
        listing = _measure(agent.list_grants, n)
        granting = _measure(lambda: agent.request_grant("orders-replica", ttl_seconds=60), n)
        failing = []
        audit = stack.processes["audit"]
        for _ in range(3):
            audit.send_signal(signal.SIGSTOP)
            started = time.perf_counter()
            try:
                agent.request_grant("orders-replica", ttl_seconds=60)
                raise SystemExit("a grant was issued while audit was paused")
            except Unavailable:
                failing.append((time.perf_counter() - started) * 1000)
            finally:
                audit.send_signal(signal.SIGCONT)
        agent.close()
        channel.close()
    base = statistics.median(floor)
    print(f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}")
    print(f"{n} sequential calls each, one client, after 20 warm-up calls\n")
    print("| call | p50 ms | p99 ms | p50 / floor |")
    print("|---|---|---|---|")
    print(_row("floor: issuer health check (1 TLS hop)", floor, base))
    print(_row("ListGrants (issuer → verifier, Redis)", listing, base))
    print(_row("RequestGrant (verifier, policy, durable audit, Redis)", granting, base))
    print(
        "\nRequestGrant with audit paused (SIGSTOP): UNAVAILABLE after "
        + ", ".join(f"{ms:.0f} ms" for ms in failing)
        + " (policy's audit deadline is 2 s)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
