"""One mTLS gRPC hop: a unary call beside a message on an open bidirectional stream.

Run: `make bench-hop` (or `.venv/bin/python bench/hop.py [CALLS]`). A grpc.aio
server in its own process echoes a 600-byte message (the size of an identity
assertion); the client sends it as unary calls, then as messages on one open
stream matched to their replies in order, one and 16 in flight. Each row is
the CPU both processes spent per call, read from /proc: what batching or
streaming jitgate's internal hops could save at most per hop.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grants import cpu_seconds  # bench/grants.py (run from bench/, as soak.py does)

from jitgate.common import tls
from jitgate.devstack import pki
from jitgate.devstack.redis_server import free_port

SERVICE = "jitgate.hop.Hop"
PAYLOAD = b"a" * 600


def _identity(data: bytes) -> bytes:
    return data


async def serve(listen: str, pki_dir: Path) -> None:
    """Echo unary calls and stream messages until killed."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def stream(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "Stream": grpc.stream_stream_rpc_method_handler(stream, _identity, _identity),
        },
    )
    server = grpc.aio.server(options=tls.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    files = pki.DevPki(pki_dir).files("policy")
    server.add_secure_port(listen, tls.server_credentials(files, require_client_auth=True))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


Load = Callable[[int, int], Awaitable[None]]


def unary_load(channel: grpc.aio.Channel) -> Load:
    """calls unary calls, in_flight at a time."""
    call = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)

    async def run(calls: int, in_flight: int) -> None:
        async def worker() -> None:
            for _ in range(calls // in_flight):
                await call(PAYLOAD, timeout=5)

        await asyncio.gather(*(worker() for _ in range(in_flight)))

    return run


def stream_load(channel: grpc.aio.Channel) -> Load:
    """calls messages on one open stream, in_flight at a time, replies matched in order."""
    open_stream = channel.stream_stream(f"/{SERVICE}/Stream", _identity, _identity)

    async def run(calls: int, in_flight: int) -> None:
        stream = open_stream(timeout=600)
        waiting: asyncio.Queue[asyncio.Future[bytes]] = asyncio.Queue()
        sending = asyncio.Lock()
        loop = asyncio.get_running_loop()

        async def reader() -> None:
            try:
                while (reply := await stream.read()) is not grpc.aio.EOF:
                    (await waiting.get()).set_result(reply)
            finally:  # a broken stream fails every call still waiting, never hangs it
                while not waiting.empty():
                    waiting.get_nowait().set_exception(RuntimeError("the stream ended"))

        async def worker() -> None:
            for _ in range(calls // in_flight):
                reply: asyncio.Future[bytes] = loop.create_future()
                async with sending:  # the queue's order is the stream's order
                    waiting.put_nowait(reply)
                    await stream.write(PAYLOAD)
                await reply

        replies = asyncio.create_task(reader())
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        await stream.done_writing()
        await replies

    return run


async def measure(address: str, pki_dir: Path, server_pid: int, calls: int) -> None:
    """Warm up, then print one row per (way, in flight): calls/s and CPU per call."""
    files = pki.DevPki(pki_dir).files("issuer")
    channel = tls.secure_channel(address, tls.channel_credentials(files), server_name="policy")
    loads = {"unary call": unary_load(channel), "stream message": stream_load(channel)}
    for load in loads.values():
        await load(400, 16)
    per_call: dict[tuple[str, int], float] = {}
    print("| way | in flight | calls/s | client ms CPU | server ms CPU | both |")
    print("|---|---|---|---|---|---|")
    for in_flight in (1, 16):
        calls -= calls % in_flight  # each of in_flight workers makes calls // in_flight
        for name, load in loads.items():
            client, server, started = time.process_time(), cpu_seconds(server_pid), time.time()
            await load(calls, in_flight)
            seconds = time.time() - started
            client_ms = 1000 * (time.process_time() - client) / calls
            server_ms = 1000 * (cpu_seconds(server_pid) - server) / calls
            per_call[name, in_flight] = client_ms + server_ms
            print(
                f"| {name} | {in_flight} | {calls / seconds:,.0f} | {client_ms:.3f}"
                f" | {server_ms:.3f} | {client_ms + server_ms:.3f} |"
            )
    await channel.close(None)
    for in_flight in (1, 16):
        ratio = per_call["stream message", in_flight] / per_call["unary call", in_flight]
        print(f"\nstream message / unary call, CPU, {in_flight} in flight: {ratio:.2f}", end="")
    print()


def main(calls: int) -> None:
    """Start the echo server with fresh dev certificates, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="jitgate-hop-") as name:
        pki_dir = Path(name)
        pki.init(pki_dir, ("policy", "issuer"))
        address = f"127.0.0.1:{free_port()}"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", address, str(pki_dir)],
            stdout=subprocess.PIPE,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != b"ready":
                raise SystemExit("the echo server did not start")
            print(
                f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}"
                f" · {os.cpu_count()} cores · {calls} calls a row\n"
            )
            asyncio.run(measure(address, pki_dir, server.pid, calls))
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(sys.argv[2], Path(sys.argv[3])))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
