"""A TLS listener that counts handshakes in progress and refuses past a cap before any TLS.

asyncio's TLS servers start each handshake inside the event loop's accept,
where nothing can count it first: a flood of connections that never finish
their handshake would each hold a socket and the loop's time for the whole
handshake deadline. Here the accept is ours (loop.sock_accept): a new
connection is counted, or closed at once over the cap (as OpenSSH's
MaxStartups does), before its handshake starts (loop.connect_accepted_socket,
which works the same under asyncio and uvloop; a server-side start_tls after
a plain accept does not under uvloop 0.23).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

from jitgate.proxy.caps import Tally, Throttle, peer_address

log = logging.getLogger(__name__)

BACKLOG = 128
"""Connections the kernel queues before our accept takes them."""
ACCEPT_RETRY = 0.1
"""Seconds to wait after a failed accept (out of file descriptors): no busy loop."""

Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]


class TlsListener:
    """Accepts TCP, counts each TLS handshake in progress by client address, hands on streams."""

    def __init__(
        self,
        *,
        name: str,
        listen: str,
        tls: ssl.SSLContext,
        handshake_timeout: float,
        handshakes: Tally,
        connected: Connected,
    ) -> None:
        self.name = name
        self._listen = listen
        self._tls = tls
        self._timeout = handshake_timeout
        self.handshakes = handshakes
        """TLS handshakes in progress, by client address."""
        self._connected = connected
        self._sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals = Throttle(log)
        self._accept_errors = Throttle(log)

    @property
    def port(self) -> int:
        """The port listened on (the first address's, if the host has several)."""
        bound: int = self._sockets[0].getsockname()[1]
        return bound

    async def start(self) -> None:
        """Bind every address host:port resolves to, as asyncio's servers do, and accept on each."""
        host, _, port = self._listen.rpartition(":")
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _, address in dict.fromkeys(found):
                listener = socket.socket(family, kind, proto)
                self._sockets.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # IPv6 only, as asyncio's servers: an IPv4 client is the IPv4
                    # socket's, counted under its own address, not ::ffff:….
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
                listener.listen(BACKLOG)
                listener.setblocking(False)
        except OSError:
            for listener in self._sockets:
                listener.close()
            self._sockets.clear()
            raise
        for listener in self._sockets:
            acceptor = loop.create_task(self._accept_loop(listener))
            acceptor.add_done_callback(self._acceptor_done)
            self._acceptors.append(acceptor)

    async def stop(self) -> None:
        """Stop accepting and abandon the handshakes in progress."""
        tasks = [*self._acceptors, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._sockets:
            listener.close()

    def _acceptor_done(self, task: asyncio.Task[None]) -> None:
        """An accept loop ends only when stopped; say so if anything else ended it."""
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: no longer accepting connections", self.name, exc_info=task.exception())

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Take each new connection: count its handshake and start it, or close it over the cap."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, remote = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, most likely: wait, then go on
                held = self._accept_errors.due()
                if held is not None:
                    log.warning("%s: accept failed %d time(s): %s", self.name, held, exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            address, _ = peer_address(remote)
            if not self.handshakes.take(address):
                conn.close()  # before any TLS: no handshake is spent on it
                self._refusals.warning(
                    "%s: closed a new connection from %s at once: %d TLS handshakes in"
                    " progress, %d from it",
                    self.name,
                    address,
                    self.handshakes.total,
                    self.handshakes[address],
                )
                continue
            task = loop.create_task(self._handshake(conn, address))
            self._tasks.add(task)

            def done(
                task: asyncio.Task[None], conn: socket.socket = conn, key: str = address
            ) -> None:
                """Uncount the handshake however its task ended, even cancelled before it ran."""
                self._tasks.discard(task)
                self.handshakes.give_back(key)
                if task.cancelled():
                    conn.close()

            task.add_done_callback(done)

    async def _handshake(self, conn: socket.socket, address: str) -> None:
        """Run the TLS handshake within its deadline, then hand the streams on."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._tls, ssl_handshake_timeout=self._timeout
            )
        except Exception as exc:  # any failure is the handshake's: scanners, bad TLS
            log.debug("%s: TLS handshake with %s failed: %s", self.name, address, exc)
            conn.close()
            return
        try:
            self._connected(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        except Exception:
            log.exception("%s: serving a connection from %s failed", self.name, address)
            transport.abort()
