"""The SSH relay: each agent session channel paired with one upstream session channel.

The agent's requests on a session channel (RFC 4254 section 6: pty-req, env,
then one of shell, exec or subsystem) are replayed on a channel the proxy
opens on its own upstream connection; data, EOF, window changes, signals and
the exit status then flow between the two. Bytes are counted each way.

Until the upstream channel is open the agent's channel offers a small window
(PENDING_WINDOW), so little can wait here; it opens to OPEN_WINDOW after.
Only the environment variables in the allow-list are passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import asyncssh

from jitgate.proxy.session import Relay

if TYPE_CHECKING:
    from asyncssh.channel import SSHChannel

TermSize = tuple[int, int, int, int]
TermModes = Mapping[int, int]

log = logging.getLogger(__name__)

REFUSED_EXIT = 255
"""What ssh(1) itself exits with when the session could not be had."""
PENDING_WINDOW = 64 * 1024
"""The window an agent's session channel offers until its upstream channel is open (two packets)."""
OPEN_WINDOW = 2 * 1024 * 1024
"""The window it offers once the upstream channel is open (asyncssh's and OpenSSH's default)."""
MAX_HELD_SIGNALS = 8
"""Signals held for a command whose upstream channel is still opening; more are dropped."""
PASSED_ENV = re.compile(rb"LANG|LC_[A-Z_]{1,32}|TERM|COLORTERM|NO_COLOR")
"""Env variables passed on: the locale's (as Debian's SendEnv/AcceptEnv) and the terminal's."""
MAX_PASSED_ENV = 32
"""At most this many of them per channel."""


def passed_env(label: str, env: Mapping[bytes, bytes]) -> dict[bytes | str, bytes | str]:
    """The part of an agent's env requests (RFC 4254 section 6.4) that goes to the host."""
    # Filtering here, not by the host's AcceptEnv alone: a host that accepts
    # everything would let an agent set LD_PRELOAD, BASH_ENV or PATH for the
    # proxy's account.
    passed: dict[bytes | str, bytes | str] = {}
    for name, value in env.items():
        if PASSED_ENV.fullmatch(name) and len(passed) < MAX_PASSED_ENV:
            passed[name] = value
        else:
            log.debug("ssh %s: env %r not passed on", label, name[:32])
    return passed


def _quietly(action: Callable[[], object]) -> None:
    """Run action, ignoring the errors of a channel that is closing."""
    # A channel closing under us raises on write; the relay is ending anyway.
    with contextlib.suppress(OSError, asyncssh.Error):
        action()


class UpstreamSide(asyncssh.SSHClientSession[bytes]):
    """The upstream channel of a pair: what the host sends goes to the agent."""

    def __init__(self, agent: AgentSide) -> None:
        """Relay to agent's channel."""
        self._agent = agent
        self._status: int | None = None
        self._signal: tuple[str, bool, str, str] | None = None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Relay stdout (or stderr, RFC 4254 section 5.2 extended data) to the agent."""
        self._agent.stats.bytes_to_client += len(data)
        self._agent.send(data, datatype)

    def eof_received(self) -> bool:
        """The host's output ended: pass the EOF on and keep the channel half open."""
        self._agent.send_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        """Remember the exit status, for the agent at close (RFC 4254 section 6.10)."""
        self._status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        """Remember the signal the command died of, for the agent at close."""
        self._signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        """The host's window is full: stop reading from the agent."""
        self._agent.pause()

    def resume_writing(self) -> None:
        """The host takes data again: read from the agent again."""
        self._agent.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        """The host closed the channel: close the agent's, with the exit status or signal."""
        self._agent.upstream_closed(self._status, self._signal)


class AgentSide(asyncssh.SSHServerSession[bytes]):
    """The agent's session channel: its requests are replayed upstream once it picks one."""

    def __init__(
        self,
        *,
        upstream: asyncssh.SSHClientConnection,
        stats: Relay,
        label: str,
        on_close: Callable[[AgentSide], None],
        before_open: Callable[[], None] = lambda: None,
    ) -> None:
        """Pair a new agent channel with a channel on upstream; count bytes in stats.

        before_open runs as the upstream channel is about to be opened.
        """
        self._before_open = before_open
        self.stats = stats
        self._upstream = upstream
        self._label = label
        self._on_close = on_close
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._peer: asyncssh.SSHClientChannel[bytes] | None = None
        self._pty: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        self._command: str | None = None
        self._subsystem: str | None = None
        # What the agent sent while the host's channel was opening, in order.
        self._held: list[Callable[[asyncssh.SSHClientChannel[bytes]], object]] = []
        self._held_signals = 0
        self._ended = False
        self._opener: asyncio.Task[None] | None = None

    # The agent's side (asyncssh.SSHServerSession) ---------------------------

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        """The agent opened the channel."""
        assert isinstance(chan, asyncssh.SSHServerChannel)
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: TermSize, term_modes: TermModes) -> bool:
        """Remember the terminal, to ask the host for the same (RFC 4254 section 6.2)."""
        self._pty = (term_type, term_size, dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        """A login shell (RFC 4254 section 6.5)."""
        return True

    def exec_requested(self, command: str) -> bool:
        """A command (RFC 4254 section 6.5)."""
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        """A subsystem such as sftp (RFC 4254 section 6.5), relayed as bytes."""
        self._subsystem = subsystem
        return True

    def session_started(self) -> None:
        """The agent picked what to run: open the upstream channel for it."""
        # The request was already answered: asyncssh asks for the answer
        # synchronously, and the upstream's comes later. A refusal upstream
        # is told on stderr with ssh's own exit status for it.
        self._opener = asyncio.create_task(self._open(), name=f"ssh channel {self._label}")
        what = f"subsystem {self._subsystem[:32]}" if self._subsystem else None
        what = what or ("exec" if self._command is not None else "shell")
        log.info("ssh %s: %s%s", self._label, what, " with a pty" if self._pty else "")

    async def _open(self) -> None:
        """Open the upstream channel with the agent's requests, then let the agent's input flow."""
        assert self._chan is not None
        self._before_open()
        env = passed_env(self._label, self._chan.get_environment_bytes())
        asked_size = self._pty[1] if self._pty else None
        try:
            peer, _ = await self._upstream.create_session(
                lambda: UpstreamSide(self),
                command=self._command,
                subsystem=self._subsystem,
                env=env,
                send_env=None,
                request_pty=self._pty is not None,
                term_type=self._pty[0] if self._pty else None,
                term_size=asked_size,
                term_modes=self._pty[2] if self._pty else None,
                encoding=None,
            )
        except (asyncssh.Error, OSError, ValueError) as exc:
            log.warning("ssh %s: the host refused the session: %s", self._label, exc)
            _quietly(lambda: self.send(b"jitgate: the host refused this session\r\n", 1))
            _quietly(lambda: self._exit(REFUSED_EXIT))
            return
        assert isinstance(peer, asyncssh.SSHClientChannel)
        if self._ended or self._chan.is_closing():
            peer.abort()
            return
        self._peer = peer
        with contextlib.suppress(OSError, asyncssh.Error):
            # The terminal's size as it is now (RFC 4254 section 6.7), then what
            # was taken meanwhile, in its order. Reading is paused after the
            # first chunk, so later input waits in asyncssh and a signal (not
            # flow-controlled) can overtake it, as it can after the open.
            if self._pty is not None and self._pty[1] != asked_size:
                peer.change_terminal_size(*self._pty[1])
            for action in self._held:
                action(peer)
        self._held.clear()
        self._widen(self._chan)
        _quietly(self._chan.resume_reading)

    @staticmethod
    def _widen(chan: asyncssh.SSHServerChannel[bytes]) -> None:
        """Open the agent's window to OPEN_WINDOW now that its data has somewhere to go."""
        # RFC 4254 section 5.2: the receiver widens a window with window
        # adjustments. asyncssh has no call for it: it tops the window back up
        # to the channel's initial size as data is taken in, so raising that
        # size opens the window at the next data delivered (resume_reading
        # delivers what is queued; an idle agent still has window left to send).
        chan._init_recv_window = max(chan._init_recv_window, OPEN_WINDOW)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Relay the agent's input to the host (held until the host's channel is open)."""
        self.stats.bytes_from_client += len(data)
        if self._peer is None:
            self._held.append(lambda peer: peer.write(data))
            if self._chan is not None:
                self._chan.pause_reading()  # at most one window is held here
            return
        peer = self._peer
        _quietly(lambda: peer.write(data))

    def eof_received(self) -> bool:
        """The agent's input ended: pass it on, keep the channel half open for output."""
        if self._peer is None:
            self._held.append(lambda peer: peer.write_eof())
        else:
            _quietly(self._peer.write_eof)
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        """A window change (RFC 4254 section 6.7), passed on."""
        if self._peer is not None:
            peer = self._peer
            _quietly(lambda: peer.change_terminal_size(width, height, pixwidth, pixheight))
        elif self._pty is not None:
            self._pty = (self._pty[0], (width, height, pixwidth, pixheight), self._pty[2])

    def signal_received(self, signal: str) -> None:
        """A signal for the command (RFC 4254 section 6.9), passed on (held until it runs)."""
        if self._peer is not None:
            peer = self._peer
            _quietly(lambda: peer.send_signal(signal))
        elif self._held_signals < MAX_HELD_SIGNALS:
            self._held_signals += 1
            self._held.append(lambda peer: peer.send_signal(signal))

    def break_received(self, msec: int) -> bool:
        """A break (RFC 4335), passed on."""
        if self._peer is None:
            return False
        peer = self._peer
        _quietly(lambda: peer.send_break(msec))
        return True

    def pause_writing(self) -> None:
        """The agent's window is full: stop reading from the host."""
        if self._peer is not None:
            _quietly(self._peer.pause_reading)

    def resume_writing(self) -> None:
        """The agent takes data again: read from the host again."""
        if self._peer is not None:
            _quietly(self._peer.resume_reading)

    def connection_lost(self, exc: Exception | None) -> None:
        """The agent's channel closed: close the host's."""
        self._ended = True
        if self._peer is not None:
            _quietly(self._peer.close)
        if self._opener is not None and not self._opener.done():
            self._opener.cancel()
        self._on_close(self)

    # Called by the upstream side and the front end --------------------------

    def send(self, data: bytes, datatype: asyncssh.DataType) -> None:
        """Write data to the agent's channel (stdout, or stderr when datatype is 1)."""
        if self._chan is not None and not self._ended:
            chan = self._chan
            _quietly(lambda: chan.write(data, datatype))

    def send_eof(self) -> None:
        """Tell the agent the output ended."""
        if self._chan is not None and not self._ended:
            _quietly(self._chan.write_eof)

    def pause(self) -> None:
        """Stop reading the agent's input."""
        if self._chan is not None:
            _quietly(self._chan.pause_reading)

    def resume(self) -> None:
        """Read the agent's input again."""
        if self._chan is not None:
            _quietly(self._chan.resume_reading)

    def _exit(self, status: int) -> None:
        """Close the agent's channel with an exit status."""
        if self._chan is not None:
            self._chan.exit(status)

    def upstream_closed(
        self, status: int | None, signal: tuple[str, bool, str, str] | None
    ) -> None:
        """The host's channel closed: close the agent's with what the host reported."""
        if self._chan is None or self._ended:
            return
        chan = self._chan
        if signal is not None:
            _quietly(lambda: chan.exit_with_signal(*signal))
        elif status is not None:
            _quietly(lambda: chan.exit(status))
        else:
            _quietly(chan.close)

    def end(self, message: bytes) -> None:
        """The grant ended: say why on stderr and close the channel (nothing more is relayed)."""
        if self._ended or self._chan is None:
            return
        self._ended = True
        chan = self._chan
        _quietly(lambda: chan.write_stderr(message))
        _quietly(chan.close)
        if self._peer is not None:
            _quietly(self._peer.abort)
