"""Port forwarding through the upstream host, for connections that allow it (RFC 4254 section 7).

A forwarded TCP connection is two SSH channels, one on the agent's connection
and one on the upstream's, joined by a pair of Tunnels that relay bytes (and
count them into the session's totals), EOF, close and flow control. Each pair
holds one of the agent connection's Slots while it is open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncssh

if TYPE_CHECKING:
    from asyncssh.channel import SSHChannel


class Slots:
    """A cap on what one agent connection holds at once: forwarded channels, or host listeners."""

    def __init__(self, limit: int, refused: Callable[[str, int], None]) -> None:
        """Up to limit at once; refused(what, limit) is told of each take over it (to log it)."""
        self.limit = limit
        self.used = 0
        self._refused = refused

    def take(self, what: str) -> bool:
        """Take a place for what; False (taking nothing) when all are in use."""
        if self.used >= self.limit:
            self._refused(what, self.limit)
            return False
        self.used += 1
        return True

    def release(self) -> None:
        """Give a place back."""
        self.used = max(0, self.used - 1)

    def once(self) -> Callable[[], None]:
        """A release for one taken place that gives it back the first time it is called only."""
        pending = [True]

        def release() -> None:
            """Give the place back, if not yet given."""
            if pending:
                pending.clear()
                self.release()

        return release


class Tunnel(asyncssh.SSHTCPSession[bytes]):
    """One side of a forwarded connection: what its channel receives goes to the peer's."""

    def __init__(self, count: Callable[[int], None], on_close: Callable[[], None]) -> None:
        """A side whose received bytes are counted with count; on_close runs as it closes."""
        self._count = count
        self._on_close = on_close
        self._chan: SSHChannel[bytes] | None = None
        self._peer: Tunnel | None = None
        self._held: list[bytes] = []
        self._eof_held = False

    @classmethod
    def pair(
        cls,
        received_here: Callable[[int], None],
        received_there: Callable[[int], None],
        on_close: Callable[[], None] = lambda: None,
    ) -> tuple[Tunnel, Tunnel]:
        """Two joined sides, each counting what it receives; on_close runs as either closes."""
        here, there = cls(received_here, on_close), cls(received_there, on_close)
        here._peer, there._peer = there, here
        return here, there

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        """The channel is open: pass on what the peer sent before it was."""
        self._chan = chan
        with contextlib.suppress(OSError):
            for data in self._held:
                chan.write(data)
            if self._eof_held:
                chan.write_eof()
        self._held.clear()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Relay data to the peer."""
        self._count(len(data))
        if self._peer is not None:
            self._peer.send(data)

    def eof_received(self) -> bool:
        """Half-close the peer too; keep this side open for the reply."""
        if self._peer is not None:
            self._peer.send_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """This side closed: close the peer."""
        self._on_close()
        if self._peer is not None:
            self._peer.close()

    def pause_writing(self) -> None:
        """This channel's window is full: stop reading from the peer."""
        if self._peer is not None and self._peer._chan is not None:
            self._peer._chan.pause_reading()

    def resume_writing(self) -> None:
        """This channel takes data again: read from the peer again."""
        if self._peer is not None and self._peer._chan is not None:
            self._peer._chan.resume_reading()

    def send(self, data: bytes) -> None:
        """Write data to this side's channel (held until it opens)."""
        if self._chan is None:
            self._held.append(data)
            return
        with contextlib.suppress(OSError):
            self._chan.write(data)

    def send_eof(self) -> None:
        """Half-close this side's channel."""
        if self._chan is None:
            self._eof_held = True
            return
        with contextlib.suppress(OSError):
            self._chan.write_eof()

    def close(self) -> None:
        """Close this side's channel."""
        if self._chan is not None:
            self._chan.close()


async def direct(
    upstream: asyncssh.SSHClientConnection,
    destination: tuple[str, int],
    origin: tuple[str, int],
    count: tuple[Callable[[int], None], Callable[[int], None]],
    slots: Slots,
) -> Tunnel:
    """direct-tcpip (RFC 4254 section 7.2): the host opens the connection; return the agent's side.

    count is (bytes from the agent, bytes to the agent). The caller took one of
    slots for it; it is given back when the pair closes, or here if it never opens.
    """
    release = slots.once()
    agent_side, upstream_side = Tunnel.pair(*count, on_close=release)
    try:
        await upstream.create_connection(
            lambda: upstream_side, *destination, *origin, encoding=None
        )
    except (asyncssh.Error, OSError):
        release()
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED, "the host could not open that connection"
        ) from None
    except BaseException:
        release()
        raise
    return agent_side


async def remote(
    upstream: asyncssh.SSHClientConnection,
    agent: asyncssh.SSHServerConnection,
    listen: tuple[str, int],
    count: tuple[Callable[[int], None], Callable[[int], None]],
    slots: Slots,
    closed: Callable[[], None],
) -> asyncssh.SSHListener:
    """tcpip-forward (RFC 4254 section 7.1): the host listens; each connection comes to the agent.

    count is (bytes from the agent, bytes to the agent). Each connection takes
    one of slots while open; over the cap the host's channel open is refused.
    closed is called once when the listener is closed or could not be made.
    """
    host, port = listen

    async def accept(orig_host: str, orig_port: int) -> Tunnel:
        """A connection to the host's listener: open a channel to the agent for it."""
        if not slots.take("forwarded connection"):
            # RFC 4254 section 5.1: the host's forwarded-tcpip open fails.
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, "jitgate: too many forwarded channels"
            )
        release = slots.once()
        agent_side, upstream_side = Tunnel.pair(*count, on_close=release)
        try:
            # The agent matches the channel to its request by the address it asked for.
            await agent.create_connection(
                lambda: agent_side, host, port, orig_host, orig_port, encoding=None
            )
        except (asyncssh.Error, OSError):
            release()
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, "the agent did not take the connection"
            ) from None
        except BaseException:
            release()
            raise
        return upstream_side

    try:
        listener = await upstream.create_server(accept, host, port, encoding=None)
    except (asyncssh.Error, asyncssh.ChannelListenError) as exc:
        closed()
        raise OSError(f"the host refused to listen: {exc}") from None
    except BaseException:
        closed()
        raise
    # For a port-0 request the host picked the port: accept() must name that
    # port in each forwarded-tcpip open (RFC 4254 section 7.2), or the agent's
    # ssh finds no forward of its own for it and refuses the channel.
    port = listener.get_port()
    return HostListener(listener, closed)


class HostListener(asyncssh.SSHListener):
    """A listener on the host, as the agent's connection holds it: closing it calls closed."""

    def __init__(self, inner: asyncssh.SSHListener, closed: Callable[[], None]) -> None:
        """Wrap inner (the upstream's listener); closed gives the agent's place back."""
        super().__init__()
        self._inner = inner
        self._closed = closed

    def get_port(self) -> int:
        """The port the host listens on."""
        return self._inner.get_port()

    def close(self) -> None:
        """Stop listening on the host (cancel-tcpip-forward, or the agent's connection ended)."""
        self._inner.close()
        self._closed()

    async def wait_closed(self) -> None:
        """Wait for the host's listener to close."""
        await self._inner.wait_closed()
