"""TlsListener on real sockets: handshakes counted from accept, refused past the cap before TLS.

Each test runs on asyncio's loop and on uvloop's (the proxy's default, whose
TLS is its own): the tests are plain functions that run their body on each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from jitgate.devstack import pki
from jitgate.proxy.caps import Tally
from jitgate.proxy.server import agent_tls
from jitgate.proxy.tlslisten import TlsListener

DEADLINE = 2.0
"""The handshake deadline in these tests: a refusal must come well before it."""

Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's body to its end on one of the two loops."""
    runner: Run = uvloop.run if request.param == "uvloop" else asyncio.run
    return runner


@contextlib.asynccontextmanager
async def serving(
    dev_pki: pki.DevPki, *, total: int = 2, per_address: int = 2, listen: str = "127.0.0.1:0"
) -> AsyncIterator[TlsListener]:
    """A listener that answers "hello" over TLS, under the given caps."""
    files = dev_pki.files("proxy")

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        writer.close()

    served = TlsListener(
        name="test",
        listen=listen,
        tls=agent_tls(str(files.cert), str(files.key)),
        handshake_timeout=DEADLINE,
        handshakes=Tally(total=total, per_key=per_address),
        connected=connected,
    )
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def _tls_hello(listener: TlsListener, ca: str) -> bytes:
    """Connect over TLS and read what the listener says."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", listener.port, ssl=context), 5
    )
    try:
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def _silent(listener: TlsListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection that never says a word: its handshake stays in progress."""
    return await asyncio.open_connection("127.0.0.1", listener.port)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """How long until the listener closes the connection; fails if not within seconds."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):  # closed with data unread: a reset
        assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - started


async def _wait_for(listener: TlsListener, count: int) -> None:
    """Until exactly count handshakes are in progress (the accept runs on the loop)."""
    for _ in range(200):
        if listener.handshakes.total == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{listener.handshakes.total} handshakes in progress, not {count}")


def test_a_connection_over_the_cap_is_closed_at_once_before_any_tls(
    run: Run, dev_pki: pki.DevPki, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with serving(dev_pki) as listener:
            silent = [await _silent(listener) for _ in range(2)]
            await _wait_for(listener, 2)
            reader, writer = await _silent(listener)
            assert await _closed_within(reader, DEADLINE / 2) < DEADLINE / 2
            assert "2 TLS handshakes in progress, 2 from it" in caplog.text
            writer.close()
            # The silent ones leave; their places are given back, and TLS goes on.
            for _, held in silent:
                held.close()
            await _wait_for(listener, 0)
            assert await _tls_hello(listener, str(dev_pki.ca)) == b"hello\n"

    run(body())


def test_one_address_holds_at_most_its_share(run: Run, dev_pki: pki.DevPki) -> None:
    async def body() -> None:
        async with serving(dev_pki, total=10, per_address=1) as listener:
            _, first = await _silent(listener)
            await _wait_for(listener, 1)
            reader, second = await _silent(listener)
            assert await _closed_within(reader, DEADLINE / 2) < DEADLINE / 2
            first.close()
            second.close()

    run(body())


def test_handshakes_that_succeed_give_their_places_back(run: Run, dev_pki: pki.DevPki) -> None:
    # More successful connections from one address than its cap, one after
    # another: each place is free again once its handshake is done.
    async def body() -> None:
        async with serving(dev_pki) as listener:
            for _ in range(5):
                assert await _tls_hello(listener, str(dev_pki.ca)) == b"hello\n"
            await _wait_for(listener, 0)

    run(body())


def test_a_handshake_never_finished_is_closed_at_its_deadline_and_uncounted(
    run: Run, dev_pki: pki.DevPki
) -> None:
    async def body() -> None:
        async with serving(dev_pki) as listener:
            reader, writer = await _silent(listener)
            await _wait_for(listener, 1)
            waited = await _closed_within(reader, DEADLINE + 3)
            assert DEADLINE - 0.5 < waited < DEADLINE + 3
            await _wait_for(listener, 0)
            writer.close()

    run(body())


def test_a_failed_handshake_is_uncounted_and_logged_for_debugging(
    run: Run, dev_pki: pki.DevPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="jitgate.proxy.tlslisten")

    async def body() -> None:
        async with serving(dev_pki) as listener:
            for _ in range(3):  # more than the cap, one after another
                reader, writer = await _silent(listener)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to a TLS port
                await _closed_within(reader, DEADLINE / 2)
                writer.close()
            await _wait_for(listener, 0)
            assert await _tls_hello(listener, str(dev_pki.ca)) == b"hello\n"

    run(body())
    assert "TLS handshake with 127.0.0.1 failed" in caplog.text


def test_stopping_uncounts_and_closes_the_handshakes_in_progress(
    run: Run, dev_pki: pki.DevPki
) -> None:
    async def body() -> None:
        async with serving(dev_pki, total=4, per_address=4) as listener:
            reader, writer = await _silent(listener)
            await _wait_for(listener, 1)
            await listener.stop()  # the handshake in progress is abandoned, and uncounted
            assert listener.handshakes.total == 0
            await _closed_within(reader, 1.0)
            writer.close()

    run(body())


def test_every_address_of_the_host_is_listened_on(run: Run, dev_pki: pki.DevPki) -> None:
    resolved = {a[4][0] for a in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}

    async def body() -> None:
        async with serving(dev_pki, listen="localhost:0") as listener:
            assert {sock.getsockname()[0] for sock in listener._sockets} == resolved

    run(body())
