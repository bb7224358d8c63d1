"""The floor for bench/grants.py: the same processes and hops, with handlers that do nothing.

Four processes like issuer, verifier, policy and audit, each a grpc.aio server
over TLS (mTLS between them, with the stack's own certificates and channel
options). One call to the front does what RequestGrant's hops do: the front
calls "verifier", then "policy", which calls "audit"; every handler returns
at once. What the real chain costs beyond this is jitgate's work.

Run by bench/grants.py: `python bench/floor.py ROLE LISTEN PKI_DIR [NEXT ...]`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from jitgate.common import tls
from jitgate.devstack.pki import DevPki

METHOD = "/jitgate.floor.Floor/Call"
REPLY = b"\x0a\x20" + b"r" * 32  # a small protobuf-sized answer


def _identity(data: bytes) -> bytes:
    return data


Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


def front(hops: list[grpc.aio.Channel]) -> Handler:
    """A role's handler: call each next hop in turn, then answer."""
    calls = [
        channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
        for channel in hops
    ]

    # A plain coroutine function: grpc.aio tells async handlers apart by that.
    async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        for call in calls:
            await call(request, timeout=5)
        return REPLY

    return handle


async def serve(role: str, listen: str, pki_dir: Path, hops: list[str]) -> None:
    """Serve role on listen, calling hops ("name=host:port") for each request."""
    pki = DevPki(pki_dir)
    files = pki.files(role)
    channels = []
    for hop in hops:
        name, _, address = hop.partition("=")
        channels.append(
            tls.secure_channel(address, tls.channel_credentials(files), server_name=name)
        )
    handler = grpc.method_handlers_generic_handler(
        "jitgate.floor.Floor",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                front(channels), request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.aio.server(options=tls.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    # The front takes agents' TLS without client certificates, as the issuer does.
    credentials = tls.server_credentials(files, require_client_auth=role != "issuer")
    server.add_secure_port(listen, credentials)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(None)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]))
