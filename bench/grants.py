"""RequestGrant under load on the real stack, beside the floor of the same topology, in one run.

Run: `make bench-grants` (or `.venv/bin/python bench/grants.py [SECONDS]`). The real
chain is five processes (issuer, verifier, policy, audit with fsync, Redis),
all mTLS; the floor (bench/floor.py) is four processes with the same hops and
TLS and handlers that do nothing. One async gRPC client drives both:
closed-loop at saturation, then open-loop at fixed offered rates, latency
counted from each request's scheduled time so a stall is not hidden.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port
from jitgate.devstack.stack import PROXIED_CONNECTION, Stack
from jitgate.v1 import issuer_pb2, issuer_pb2_grpc

FLOOR = Path(__file__).with_name("floor.py")
CONCURRENCY = 32
"""Requests in flight at saturation: enough to keep every process busy."""
RATES = (100, 200, 400)
ROLES = ("issuer", "verifier", "policy", "audit")

Call = Callable[[], Awaitable[object]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """What one load phase saw."""

    seconds: float
    latencies: list[float] = field(default_factory=list)  # ms, successful calls
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process of the chain used during the phase."""

    def cpu_ms_per_call(self, name: str) -> float:
        """Milliseconds of a process's CPU per successful call."""
        return 1000 * self.cpu.get(name, 0.0) / max(1, len(self.latencies))

    @property
    def rate(self) -> float:
        """Successful calls per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, p: int) -> float:
        """The p-th percentile latency in ms."""
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[p - 1]

    def failed(self, exc: BaseException) -> None:
        """Count an error by its status code (or type)."""
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        self.errors[code] = self.errors.get(code, 0) + 1


async def saturate(call: Call, seconds: float, concurrency: int = CONCURRENCY) -> Run:
    """Closed loop: concurrency workers call back to back for seconds."""
    run = Run(seconds=seconds)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (started := time.perf_counter()) < deadline:
            try:
                await call()
            except Exception as exc:  # counted, and the load goes on
                run.failed(exc)
                continue
            run.latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run


async def offer(call: Call, rate: float, seconds: float) -> Run:
    """Open loop: start a call every 1/rate s whatever the answers; latency from the schedule."""
    run = Run(seconds=seconds)
    start = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        try:
            await call()
        except Exception as exc:
            run.failed(exc)
            return
        run.latencies.append((time.perf_counter() - scheduled) * 1000)

    for n in range(int(rate * seconds)):
        scheduled = start + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return run


@contextmanager
def floor(pki_dir: Path, logs: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """Start the four no-op processes; yield the front's address and their pids by role."""
    ports = {name: free_port() for name in ("issuer", "verifier", "policy", "audit")}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    roles = [
        ("audit", []),
        ("verifier", []),
        ("policy", [f"audit={address['audit']}"]),
        ("issuer", [f"verifier={address['verifier']}", f"policy={address['policy']}"]),
    ]
    processes = []
    try:
        for role, hops in roles:
            process = subprocess.Popen(
                [sys.executable, str(FLOOR), role, address[role], str(pki_dir), *hops],
                stdout=subprocess.PIPE,
                stderr=(logs / f"floor-{role}.log").open("wb"),
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
            processes.append(process)
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise SystemExit(f"floor {role} did not start; see {logs}")
        yield (
            address["issuer"],
            {role: p.pid for (role, _), p in zip(roles, processes, strict=True)},
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def issuer_channel(stack: Stack, address: str | None = None) -> grpc.aio.Channel:
    """An agent's TLS channel to the issuer at address (the stack's by default)."""
    ca = grpc.ssl_channel_credentials(stack.pki.ca.read_bytes())
    options = [("grpc.ssl_target_name_override", "issuer")]
    return grpc.aio.secure_channel(address or stack.address("issuer"), ca, options=options)


def request_grant(channel: grpc.aio.Channel, token: str) -> Call:
    """One RequestGrant for the demo connection as the token's agent, as a call to repeat."""
    grant = issuer_pb2_grpc.IssuerStub(channel).RequestGrant
    request = issuer_pb2.RequestGrantRequest(connection=PROXIED_CONNECTION, ttl_seconds=60)
    metadata = (("authorization", f"Bearer {token}"),)
    return lambda: grant(request, metadata=metadata, timeout=5)


async def metered(pids: dict[str, int], phase: Awaitable[Run]) -> Run:
    """Run a phase and note the CPU each process in pids used during it."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    run = await phase
    run.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    return run


async def measure(
    stack: Stack, floor_address: str, floor_pids: dict[str, int], seconds: float
) -> dict[str, dict[str, Run]]:
    """Saturation, then each offered rate, on the floor and the real chain alike."""
    token = stack.token("deploy-bot")
    real_channel = issuer_channel(stack)
    floor_channel = issuer_channel(stack, floor_address)
    # The floor gets the same bytes: the request, and the token in the metadata.
    payload = issuer_pb2.RequestGrantRequest(
        connection=PROXIED_CONNECTION, ttl_seconds=60
    ).SerializeToString()
    noop = floor_channel.unary_unary(
        "/jitgate.floor.Floor/Call",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    metadata = (("authorization", f"Bearer {token}"),)
    calls: dict[str, Call] = {
        "floor": lambda: noop(payload, metadata=metadata, timeout=5),
        "jitgate": request_grant(real_channel, token),
    }
    pids = {
        "floor": floor_pids,
        "jitgate": {name: stack.processes[name].pid for name in ROLES},
    }
    if stack.redis is not None and stack.redis.process is not None:
        pids["jitgate"]["redis"] = stack.redis.process.pid
    results: dict[str, dict[str, Run]] = {name: {} for name in calls}
    for call in calls.values():  # warm up channels, caches, the JWKS
        await saturate(call, 1.0, 8)
    for name, call in calls.items():
        print(f"saturating {name} …", file=sys.stderr)
        results[name]["saturation"] = await metered(pids[name], saturate(call, seconds))
    half = results["floor"]["saturation"].rate / 2
    for rate in (*RATES, half):
        for name, call in calls.items():
            print(f"{name} at {rate:.0f}/s …", file=sys.stderr)
            results[name][f"{rate:.0f}/s"] = await metered(pids[name], offer(call, rate, seconds))
    await real_channel.close()
    await floor_channel.close()
    return results


def report(results: dict[str, dict[str, Run]], seconds: float) -> None:
    """Print the throughput, the ratio to the floor and the latency table."""
    floor_run, real_run = results["floor"]["saturation"], results["jitgate"]["saturation"]
    print(
        f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · {seconds:.0f} s per phase\n"
    )
    print(f"| at saturation ({CONCURRENCY} in flight) | calls/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for label, run in (("floor: same hops, no-op handlers", floor_run), ("RequestGrant", real_run)):
        print(
            f"| {label} | {run.rate:,.0f} | {run.percentile(50):.2f} | {run.percentile(99):.2f}"
            f" | {sum(run.errors.values())} |"
        )
    print(f"\nRequestGrant / floor at saturation: **{real_run.rate / floor_run.rate:.2f}**\n")
    print("| offered rate | floor p50 ms | floor p99 ms | RequestGrant p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for phase in results["jitgate"]:
        if phase == "saturation":
            continue
        low, real = results["floor"][phase], results["jitgate"][phase]
        label = f"{phase} (half the floor)" if phase == list(results["jitgate"])[-1] else phase
        print(
            f"| {label} | {low.percentile(50):.2f} | {low.percentile(99):.2f}"
            f" | {real.percentile(50):.2f} | {real.percentile(99):.2f}"
            f" | {sum(real.errors.values()) or ''} {real.errors or ''} |"
        )


def report_cpu(results: dict[str, dict[str, Run]]) -> None:
    """Print each process's CPU per call, floor beside jitgate, at saturation and at 200/s."""
    phases = [p for p in ("saturation", "200/s") if p in results["jitgate"]]
    print("\n| ms CPU per call | " + " | ".join(f"floor {p} | jitgate {p}" for p in phases) + " |")
    print("|---|" + "---|---|" * len(phases))
    for name in (*ROLES, "redis"):
        cells = []
        for phase in phases:
            low, real = results["floor"][phase], results["jitgate"][phase]
            floor_cell = f"{low.cpu_ms_per_call(name):.2f}" if name in low.cpu else "-"
            cells += [floor_cell, f"{real.cpu_ms_per_call(name):.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    totals = []
    for phase in phases:
        for run in (results["floor"][phase], results["jitgate"][phase]):
            totals.append(f"{sum(run.cpu_ms_per_call(n) for n in run.cpu):.2f}")
    print("| all | " + " | ".join(totals) + " |")


def main(seconds: float) -> None:
    """Start the stack and the floor, measure, print."""
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as name:
        tmp = Path(name)
        with Stack(tmp / "stack") as stack, floor(stack.pki.root, stack.logs) as (front, pids):
            pki.init(stack.pki.root)  # the floor's roles use the stack's certificates
            results = asyncio.run(measure(stack, front, pids, seconds))
    report(results, seconds)
    report_cpu(results)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
