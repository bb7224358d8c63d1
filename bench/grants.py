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

from jitgate.devstack.redis_server import free_port
from jitgate.devstack.stack import PROXIED_CONNECTION, Stack
from jitgate.v1 import issuer_pb2, issuer_pb2_grpc

FLOOR = Path(__file__).with_name("floor.py")
CONCURRENCY = 32
"""Requests in flight at saturation: enough to keep every process busy."""
RATES = (100, 200, 400)
FAIR_RATE = 200
"""The offered rate at which CPU per call is compared: below every chain's capacity."""
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
    """CPU seconds each process used during the phase: the chain's, and "client" (this one)."""

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


CHAIN = (
    ("audit", ()),
    ("verifier", ()),
    ("policy", ("audit",)),
    ("issuer", ("verifier", "policy")),
)
"""The floor's processes in start order, each with the hops it calls per request."""
FRONT_ONLY = (("issuer", ()),)
"""The agent's hop alone: what a request costs before any internal hop."""


@contextmanager
def floor(
    pki_dir: Path, logs: Path, chain: tuple[tuple[str, tuple[str, ...]], ...] = CHAIN
) -> Iterator[tuple[str, dict[str, int]]]:
    """Start chain's no-op processes; yield the front's address and their pids by role."""
    address = {role: f"127.0.0.1:{free_port()}" for role, _ in chain}
    suffix = "" if chain == CHAIN else "-front"
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for role, hops in chain:
            process = subprocess.Popen(
                [sys.executable, str(FLOOR), role, address[role], str(pki_dir)]
                + [f"{hop}={address[hop]}" for hop in hops],
                stdout=subprocess.PIPE,
                stderr=(logs / f"floor{suffix}-{role}.log").open("wb"),
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
            processes[role] = process
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise SystemExit(f"floor {role} did not start; see {logs}")
        yield address["issuer"], {role: p.pid for role, p in processes.items()}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
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
    """Run a phase and note the CPU each process in pids, and this client, used during it."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client = time.process_time()
    run = await phase
    run.cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    run.cpu["client"] = time.process_time() - client
    return run


async def measure(
    stack: Stack,
    floors: dict[str, tuple[str, dict[str, int]]],
    seconds: float,
) -> dict[str, dict[str, Run]]:
    """Saturation, then each offered rate, on the floor and the real chain alike.

    floors maps "floor" (the whole no-op chain) and "front" (its front alone)
    to their address and pids; the front is measured at saturation and 200/s.
    """
    token = stack.token("deploy-bot")
    real_channel = issuer_channel(stack)
    floor_channels = {name: issuer_channel(stack, address) for name, (address, _) in floors.items()}
    # The floor gets the same bytes: the request, and the token in the metadata.
    payload = issuer_pb2.RequestGrantRequest(
        connection=PROXIED_CONNECTION, ttl_seconds=60
    ).SerializeToString()
    metadata = (("authorization", f"Bearer {token}"),)
    calls: dict[str, Call] = {
        name: noop_call(channel, payload, metadata) for name, channel in floor_channels.items()
    }
    calls["jitgate"] = request_grant(real_channel, token)
    pids = {name: dict(floor_pids) for name, (_, floor_pids) in floors.items()}
    pids["jitgate"] = {name: stack.processes[name].pid for name in ROLES}
    if stack.redis is not None and stack.redis.process is not None:
        pids["jitgate"]["redis"] = stack.redis.process.pid
    results: dict[str, dict[str, Run]] = {name: {} for name in calls}
    for call in calls.values():  # warm up channels, caches, the JWKS
        await saturate(call, 1.0, 8)
    for name, call in calls.items():
        print(f"saturating {name} …", file=sys.stderr)
        results[name]["saturation"] = await metered(pids[name], saturate(call, seconds))
    half = results["floor"]["saturation"].rate / 2
    rates = [*RATES] + ([] if round(half) in RATES else [half])
    for rate in rates:
        for name, call in calls.items():
            if name == "front" and rate != FAIR_RATE:
                continue
            print(f"{name} at {rate:.0f}/s …", file=sys.stderr)
            results[name][f"{rate:.0f}/s"] = await metered(pids[name], offer(call, rate, seconds))
    # The floors once more at RequestGrant's own saturation rate: their hops'
    # cost at the rate the real chain's hops run at (see report_bound).
    matched = results["jitgate"]["saturation"].rate
    for name in ("front", "floor"):
        print(f"{name} at {matched:.0f}/s (RequestGrant's rate) …", file=sys.stderr)
        results[name]["matched"] = await metered(pids[name], offer(calls[name], matched, seconds))
    await real_channel.close()
    for channel in floor_channels.values():
        await channel.close()
    return results


def noop_call(
    channel: grpc.aio.Channel, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> Call:
    """One call to a floor's front with RequestGrant's bytes, as a call to repeat."""
    noop = channel.unary_unary(
        "/jitgate.floor.Floor/Call",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    return lambda: noop(payload, metadata=metadata, timeout=5)


def report(results: dict[str, dict[str, Run]], seconds: float) -> None:
    """Print the throughput, the ratio to the floor and the latency table."""
    floor_run, real_run = results["floor"]["saturation"], results["jitgate"]["saturation"]
    print(
        f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} cores · "
        f"Python {platform.python_version()} · {seconds:.0f} s per phase\n"
    )
    print(f"| at saturation ({CONCURRENCY} in flight) | calls/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    rows = (
        ("floor: the agent's hop alone", results["front"]["saturation"]),
        ("floor: same hops, no-op handlers", floor_run),
        ("RequestGrant", real_run),
    )
    for label, run in rows:
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
        half = round(floor_run.rate / 2)
        label = f"{phase} (half the floor)" if phase == f"{half}/s" else phase
        print(
            f"| {label} | {low.percentile(50):.2f} | {low.percentile(99):.2f}"
            f" | {real.percentile(50):.2f} | {real.percentile(99):.2f}"
            f" | {sum(real.errors.values()) or ''} {real.errors or ''} |"
        )


def report_cpu(results: dict[str, dict[str, Run]]) -> None:
    """Print each process's CPU per call (front alone, floor, jitgate) at saturation and 200/s."""
    phases = ("saturation", f"{FAIR_RATE}/s")
    chains = ("front", "floor", "jitgate")
    print(
        "\n| ms CPU per call | "
        + " | ".join(f"{chain} {phase}" for phase in phases for chain in chains)
        + " |"
    )
    print("|---|" + "---|" * len(phases) * len(chains))
    for name in (*ROLES, "redis", "client"):
        cells = []
        for phase in phases:
            for chain in chains:
                run = results[chain][phase]
                cells.append(f"{run.cpu_ms_per_call(name):.2f}" if name in run.cpu else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    totals = [f"{total_cpu(results[c][p]):.2f}" for p in phases for c in chains]
    print("| all, client included | " + " | ".join(totals) + " |")


def total_cpu(run: Run) -> float:
    """Milliseconds of CPU per successful call, every process and the client together."""
    return sum(run.cpu_ms_per_call(n) for n in run.cpu)


def report_bound(results: dict[str, dict[str, Run]], goal: float = 0.70) -> None:
    """Print the CPU a grant may cost to meet the goal, and what free internal hops could do.

    At saturation the two cores are the limit, so calls/s x CPU per call is the
    CPU the chain used (cores), and a grant that cost less CPU would go
    proportionally faster. The floor minus its front alone is what the three
    internal hops cost at both ends. That cost depends on the rate (more calls
    per wake-up when busier), so it is priced twice: at the floor's own
    saturation, and with both floors offered RequestGrant's saturation rate.
    Batching or streaming the hops could at best remove that much from a grant.
    """
    floor, real = results["floor"]["saturation"], results["jitgate"]["saturation"]
    cores = real.rate * total_cpu(real) / 1000
    budget = cores * 1000 / (goal * floor.rate)
    print(
        f"\nAt saturation the chain used {cores:.2f} cores. {goal:.2f} of the floor "
        f"({goal * floor.rate:,.0f}/s) allows {budget:.2f} ms of CPU per grant, client "
        f"included; a grant costs {total_cpu(real):.2f} ms, of which the floor's hops and "
        f"no-op handlers are {total_cpu(floor):.2f} at the floor's own rate."
    )
    pricings = {"at the floor's saturation": ("saturation", "saturation")}
    if "matched" in results["floor"] and "matched" in results["front"]:
        pricings[f"at RequestGrant's rate ({real.rate:,.0f}/s)"] = ("matched", "matched")
    for label, (floor_phase, front_phase) in pricings.items():
        hops = total_cpu(results["floor"][floor_phase]) - total_cpu(results["front"][front_phase])
        best = real.rate / max(0.01, 1 - hops / total_cpu(real))
        print(
            f"The three internal hops cost {hops:.2f} ms per call {label}; were they free, "
            f"RequestGrant would reach {best:,.0f}/s: {best / floor.rate:.2f} of the floor."
        )


def main(seconds: float) -> None:
    """Start the stack and the floors, measure, print."""
    with tempfile.TemporaryDirectory(prefix="jitgate-bench-") as name:
        tmp = Path(name)
        with (
            Stack(tmp / "stack") as stack,
            floor(stack.pki.root, stack.logs) as whole,
            floor(stack.pki.root, stack.logs, FRONT_ONLY) as front,
        ):
            results = asyncio.run(measure(stack, {"floor": whole, "front": front}, seconds))
    report(results, seconds)
    report_cpu(results)
    report_bound(results)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
