"""The proxy's SSH front end: an agent logs in with its grant, the proxy with a key only it holds.

The SSH user name is the connection's name and the password the grant token
(RFC 4252 section 8; keyboard-interactive, RFC 4256, asks for the same). A
redeemed grant opens one upstream connection, authenticated with the
connection's private key and checked against its pinned host key; each agent
session channel is relayed to a channel on it (sshrelay). The whole agent
connection is one session under Gate.hold: revocation and expiry end it.
Limits caps what an agent, an address and everyone together hold at once:
channels per connection, logins in progress, connections, connections per grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from opentelemetry import trace

from jitgate.common import telemetry
from jitgate.common.errors import (
    ConfigError,
    JitgateError,
    Unauthenticated,
)
from jitgate.common.jws import MAX_TOKEN_BYTES
from jitgate.proxy import sshagent, sshforward, sshrelay, sshupstream
from jitgate.proxy.caps import Tally, Throttle, peer_address
from jitgate.proxy.config import SshTarget
from jitgate.proxy.gate import Gate, Lease
from jitgate.proxy.refusals import refused
from jitgate.proxy.session import HANDSHAKE_TIMEOUT, Redeemed, Relay
from jitgate.proxy.sshforward import Slots, Tunnel
from jitgate.proxy.sshrelay import AgentSide
from jitgate.proxy.sshupstream import HostKeys

log = logging.getLogger(__name__)

KIND = "ssh"
DEFAULT_LISTEN = "127.0.0.1:2222"
CLOSE_GRACE = 1.0
"""Seconds an ended session's agent gets to read why and leave before the proxy disconnects it."""
MAX_SESSIONS = 10
"""Session channels open at once on one agent connection (OpenSSH's MaxSessions default)."""
MAX_FORWARDS = 32
"""Forwarded channels (direct-tcpip and forwarded-tcpip) open at once on one agent connection."""
MAX_LISTENERS = 8
"""Host listeners (ssh -R, tcpip-forward) held at once by one agent connection."""
MAX_STARTUPS = 64
"""Logins in progress at once, accept to a finished login (as OpenSSH's MaxStartups); more close."""
MAX_STARTUPS_PER_SOURCE = 16
"""Logins in progress at once from one client address (as OpenSSH's PerSourceMaxStartups)."""
MAX_CONNECTIONS = 512
"""Agent connections open at once, logins in progress included; more are closed at accept."""
MAX_PER_GRANT = 16
"""Agent connections holding one grant at once; more are refused before the grant is redeemed."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The listener's caps: the module constants unless a test (or an operator) sets others."""

    max_sessions: int = MAX_SESSIONS
    max_forwards: int = MAX_FORWARDS
    max_listeners: int = MAX_LISTENERS
    max_startups: int = MAX_STARTUPS
    max_startups_per_source: int = MAX_STARTUPS_PER_SOURCE
    max_connections: int = MAX_CONNECTIONS
    max_per_grant: int = MAX_PER_GRANT


class SshFrontend:
    """The SSH listener: one AgentConnection per agent, all in the Gate's registry."""

    def __init__(
        self,
        *,
        gate: Gate,
        targets: dict[str, SshTarget],
        host_key: Path,
        listen: str,
        login_timeout: float = HANDSHAKE_TIMEOUT,
        limits: Limits | None = None,
    ) -> None:
        """Serve targets on listen ("host:port") with the OpenSSH private host key at host_key."""
        self.login_timeout = login_timeout
        """From accept to a redeemed grant; an agent that stalls longer is dropped."""
        self.limits = limits or Limits()
        self.gate = gate
        self.targets = dict(targets)
        self.keys = {name: HostKeys(target) for name, target in self.targets.items()}
        self._host_key_path = host_key
        self._listen = listen
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.live: set[AgentConnection] = set()
        self.workdir: Path | None = None
        """A private directory for agent forwarding's sockets, while listening."""
        self._starting = Tally(
            total=self.limits.max_startups, per_key=self.limits.max_startups_per_source
        )
        """Logins in progress by client address."""
        self._grants = Tally(per_key=self.limits.max_per_grant)
        """Agent connections holding (or redeeming) each grant, by grant id."""
        self.refusals = Throttle(log)
        """Log lines about connections closed over a cap."""

    def accept(self, agent: AgentConnection, source: str) -> str | None:
        """Count a new connection in; None, or why it is over a cap and must be closed at once."""
        limits = self.limits
        # Each login costs a key exchange on the event loop the whole proxy
        # shares: caps as OpenSSH's MaxStartups and PerSourceMaxStartups
        # keep a flood of handshakes from starving the sessions already open.
        if len(self.live) >= limits.max_connections:
            return f"{len(self.live)} agent connections open, the limit"
        if not self._starting.take(source):
            starting, mine = self._starting.total, self._starting[source]
            if starting >= limits.max_startups:
                return f"{starting} logins in progress, the limit"
            return f"{mine} logins in progress from {source}, the limit"
        self.live.add(agent)
        return None

    def login_over(self, source: str) -> None:
        """A login from source is over: in, refused or gone."""
        self._starting.give_back(source)

    def hold_grant(self, grant_id: str) -> bool:
        """Count one more connection on grant_id; False, counting nothing, if it has its cap."""
        return self._grants.take(grant_id)

    def release_grant(self, grant_id: str) -> None:
        """A connection on grant_id is over."""
        self._grants.give_back(grant_id)

    async def start(self) -> str:
        """Listen; return the address listened on."""
        try:
            host_key = asyncssh.read_private_key(self._host_key_path)
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not an OpenSSH private key"
            raise ConfigError(
                f"JITGATE_PROXY_SSH_HOST_KEY: {self._host_key_path}: {reason}"
            ) from None
        host, _, port = self._listen.rpartition(":")
        quiet = logging.getLogger("asyncssh")
        if quiet.level == logging.NOTSET:
            # asyncssh narrates every packet at INFO, commands included; the
            # session's own lines here say who, where and how it ended.
            quiet.setLevel(logging.WARNING)
        forwarding = [name for name, t in self.targets.items() if t.allow_agent_forwarding]
        self.workdir = Path(tempfile.mkdtemp(prefix="jitgate-ssh-")) if forwarding else None
        config = sshagent.server_config(self.workdir, forwarding) if self.workdir else None
        self._acceptor = await asyncssh.create_server(
            lambda: AgentConnection(self),
            host.strip("[]"),
            int(port),
            server_host_keys=[host_key],
            login_timeout=self.login_timeout,
            encoding=None,
            # Bytes as they come: asyncssh's own line editor would rewrite a pty's input.
            line_editor=False,
            # Off for every agent: X11 always (RFC 4254 section 6.3.1); agent
            # forwarding unless the config lets the connection's name have it;
            # port forwarding per connection (connection_requested, server_requested).
            x11_forwarding=False,
            config=[str(config)] if config else None,
            **({} if config else {"agent_forwarding": False}),
            allow_scp=False,
            gss_host=None,
            public_key_auth=False,
            host_based_auth=False,
        )
        sockname = self._acceptor.sockets[0].getsockname()
        return f"{sockname[0]}:{sockname[1]} (ssh)"

    async def stop(self) -> None:
        """Stop listening and end every session."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        live = list(self.live)
        for agent in live:
            agent.shut_down()
        tasks = [agent.task for agent in live if agent.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class AgentConnection(asyncssh.SSHServer):
    """One agent's SSH connection, from its first packet to close."""

    def __init__(self, frontend: SshFrontend) -> None:
        """A connection to frontend."""
        self._frontend = frontend
        self.session_id = secrets.token_hex(8)
        self.task: asyncio.Task[None] | None = None
        self._conn: asyncssh.SSHServerConnection | None = None
        self._client = ""
        self._target: SshTarget | None = None
        self._refusal = ""
        self._ready: asyncio.Future[bool] | None = None
        self._gone = asyncio.Event()
        self._upstream: asyncssh.SSHClientConnection | None = None
        self._lease: Lease | None = None
        self._stats: Relay | None = None
        self._channels: set[AgentSide] = set()
        self._numbers = itertools.count()
        self._agent_link: sshagent.AgentLink | None = None
        self._stopping = False
        self._dropped = False
        """Closed at accept, over a cap: never counted in."""
        self._source: str | None = None
        """The client address while its login is in progress (counted against MAX_STARTUPS)."""
        self._grant: str | None = None
        """The grant this connection counts against (MAX_PER_GRANT), once checked."""
        self._refusals = Throttle(log)
        """Log lines about this connection's channel opens refused over a cap."""
        self._forwards = Slots(frontend.limits.max_forwards, self._over("open"))
        self._listeners = Slots(frontend.limits.max_listeners, self._over("held"))

    # Connection and authentication (RFC 4252) ---------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """An agent connected: counted in, or closed at once if over a cap."""
        self._conn = conn
        source, self._client = peer_address(conn.get_extra_info("peername"))
        over = self._frontend.accept(self, source)
        if over is not None:
            # Before the version exchange: no key exchange is spent on it.
            self._frontend.refusals.warning(
                "ssh: closed a connection from %s at accept: %s", self._client, over
            )
            self._dropped = True
            self._gone.set()
            conn.abort()
            return
        self._source = source

    def _login_over(self) -> None:
        """The login is no longer in progress: free its MAX_STARTUPS place (once)."""
        if self._source is not None:
            self._frontend.login_over(self._source)
            self._source = None

    def auth_completed(self) -> None:
        """The agent is in: its login no longer counts as in progress."""
        self._login_over()

    def connection_lost(self, exc: Exception | None) -> None:
        """The agent's connection closed, for whatever reason."""
        self._gone.set()
        if self._dropped:
            return  # never counted in, and logged as closed over a cap
        self._login_over()
        self._frontend.live.discard(self)
        if exc is not None and self.task is None:
            log.info(
                "ssh session %s from %s: left before login: %s", self.session_id, self._client, exc
            )

    def begin_auth(self, username: str) -> bool:
        """The user name is the connection's name; an unknown one is refused before any token."""
        self._target = self._frontend.targets.get(username)
        if self._target is None:
            log.info(
                "ssh session %s from %s: refused, no connection named %r",
                self.session_id,
                self._client,
                username[:63],
            )
            self._refuse(f"no connection named {username[:63]!r}")
            asyncio.get_running_loop().call_soon(self._disconnect)
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        """The grant token is the password (and keyboard-interactive's one answer)."""
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        """Redeem the grant and log in upstream; a refusal says why and disconnects."""
        if self._target is None or self._target.name != username or self.task is not None:
            # One grant per connection: no second try once one was presented
            # (RFC 4252 section 4 lets the server end the connection instead).
            return False
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self.task = asyncio.create_task(self._run(self._target, password), name="ssh session")
        try:
            admitted = await asyncio.shield(self._ready)
        except asyncio.CancelledError:
            self._gone.set()  # the login was abandoned: the session ends with it
            raise
        if not admitted:
            # After the failure reply is sent, so the client hears both.
            loop.call_soon(self._disconnect)
        return admitted

    def _refuse(self, text: str) -> None:
        """Tell the agent why in an auth banner (RFC 4252 section 5.4): short, never internals."""
        self._refusal = f"jitgate: {text}"
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send_auth_banner(self._refusal + "\r\n")

    def _disconnect(self) -> None:
        """End a refused login, repeating why (RFC 4253 section 11.1)."""
        if self._conn is not None:
            self._conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, self._refusal or "jitgate: refused"
            )

    def _admitted(self, ok: bool) -> None:
        """Answer the waiting login: in (True) or refused (False); only the first answer counts."""
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(ok)

    # The session ---------------------------------------------------------

    async def _run(self, target: SshTarget, token: str) -> None:
        """The session, in its own span, from redemption to the agent's disconnect."""
        with telemetry.tracer().start_as_current_span(
            "proxy ssh session",
            kind=trace.SpanKind.SERVER,
            attributes={"jitgate.kind": KIND, "jitgate.session_id": self.session_id},
        ):
            try:
                await self._session(target, token)
            except Exception:  # a bug must not leave the agent waiting or the grant held
                log.exception("ssh session %s failed", self.session_id)
                self._refuse("internal error")
            finally:
                self._admitted(False)
                self._release_grant()
                if self._upstream is not None:
                    self._upstream.abort()
                if self._agent_link is not None:
                    self._agent_link.close()
                if self._lease is not None and self._conn is not None and not self._gone.is_set():
                    # A refusal is the login's to send; a session that ran is ended here.
                    why = f"grant {self._lease.reason}" if self._lease.reason else "session over"
                    self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"jitgate: {why}")

    def _release_grant(self) -> None:
        """This connection no longer counts against its grant's MAX_PER_GRANT (once)."""
        if self._grant is not None:
            self._frontend.release_grant(self._grant)
            self._grant = None

    async def _redeem(self, target: SshTarget, token: str) -> Redeemed | None:
        """Check and redeem the token; None (and a banner saying why) when refused."""
        marks = time.perf_counter()
        gate = self._frontend.gate
        try:
            if len(token) > MAX_TOKEN_BYTES:
                raise Unauthenticated("size", f"{len(token)} bytes")
            # Gate.admit's two steps, apart: a grant at its cap of connections
            # is refused after the check and before the redemption, so the
            # refused login leaves no redemption on the record.
            claims = await gate.check(token, target.name, KIND)
            if not self._frontend.hold_grant(claims.grant_id):
                cap = self._frontend.limits.max_per_grant
                self._refuse(f"too many sessions on this grant (the limit is {cap})")
                log.warning(
                    "ssh session %s from %s: refused, grant %s has %d connections, the limit",
                    self.session_id,
                    self._client,
                    claims.grant_id,
                    cap,
                )
                return None
            self._grant = claims.grant_id
            redeemed = await gate.redeem(token, target.name, self.session_id, self._client)
        except JitgateError as exc:
            denied = refused(exc, log, f"ssh session {self.session_id} from {self._client}")
            self._refuse(denied.message)
            return None
        log.info(
            "ssh session %s: %s on %s until %s (grant %s; admitted in %.1f ms)",
            self.session_id,
            redeemed.subject,
            target.name,
            time.strftime("%H:%M:%S", time.gmtime(redeemed.expires_at)),
            redeemed.grant_id,
            (time.perf_counter() - marks) * 1000,
        )
        return redeemed

    async def _session(self, target: SshTarget, token: str) -> None:
        """Hold the grant: log in upstream, admit the agent, wait for the end."""
        redeemed = await self._redeem(target, token)
        if redeemed is None:
            return
        telemetry.annotate(grant_id=redeemed.grant_id, connection=target.name)
        # From here the redemption is on the record, so its end must be too: hold reports it.
        async with self._frontend.gate.hold(redeemed, self.session_id, kind=KIND) as (lease, stats):
            if self._gone.is_set():
                return  # left while the grant was redeemed: client_closed
            if target.allow_agent_forwarding and self._frontend.workdir is not None:
                self._agent_link = sshagent.AgentLink(self._frontend.workdir)
            agent_path = self._agent_link.path if self._agent_link else None
            try:
                upstream = await sshupstream.connect(
                    target, self._frontend.keys[target.name], agent_path
                )
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                stats.reason = "error"
                self._refuse(f"cannot reach {target.name}")
                log.warning(
                    "ssh session %s: upstream %s failed: %s", self.session_id, target.name, exc
                )
                return
            self._upstream = upstream
            if lease.ended.is_set():
                self._refuse(f"grant {lease.reason}")
                return
            self._lease, self._stats = lease, stats
            lease.on_end(self._end)
            self._admitted(True)
            upstream_closed = asyncio.ensure_future(upstream.wait_closed())
            gone = asyncio.ensure_future(self._gone.wait())
            ended = asyncio.ensure_future(lease.ended.wait())
            try:
                await asyncio.wait(
                    {upstream_closed, gone, ended}, return_when=asyncio.FIRST_COMPLETED
                )
                if self._stopping or (upstream_closed.done() and not gone.done()):
                    stats.reason = "server_closed"
                # The channels were told why and closed (in _end, or by the host);
                # the agent gets a moment to read it and leave before the disconnect.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gone.wait(), CLOSE_GRACE)
            finally:
                for waiter in (upstream_closed, gone, ended):
                    waiter.cancel()

    def _end(self, reason: str) -> None:
        """The lease ended (revoked or expired): tell each channel why, then close everything."""
        message = f"jitgate: grant {reason}\r\n".encode()
        for channel in list(self._channels):
            channel.end(message)
        if self._upstream is not None:
            self._upstream.abort()
        log.info("ssh session %s: grant %s, closing", self.session_id, reason)

    def shut_down(self) -> None:
        """The proxy is stopping: close the agent's connection."""
        self._stopping = True
        if self._conn is not None:
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, "jitgate: the proxy is stopping")
        self._gone.set()

    # Channels (RFC 4254) -------------------------------------------------

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], AgentSide] | bool:
        """A session channel: relayed to a channel on the upstream connection."""
        if self._upstream is None or self._stats is None or self._lease is None:
            return False
        if self._lease.ended.is_set() or self._conn is None:
            return False
        cap = self._frontend.limits.max_sessions
        if len(self._channels) >= cap:
            # RFC 4254 section 5.1: a channel-open failure; the agent may try
            # again once one of its sessions closes.
            self._refusals.warning(
                "ssh session %s: session channel refused, %d open, the limit", self.session_id, cap
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, f"jitgate: at most {cap} sessions per connection"
            )
        # A small window (RFC 4254 section 5.2) until the host's channel is
        # open: all the agent can send meanwhile is held here.
        chan = self._conn.create_server_channel(encoding=None, window=sshrelay.PENDING_WINDOW)
        channel = AgentSide(
            upstream=self._upstream,
            stats=self._stats,
            label=f"{self.session_id}/{next(self._numbers)}",
            on_close=self._channels.discard,
            before_open=self._link_agent,
        )
        self._channels.add(channel)
        return chan, channel

    def _forwarding(self, what: str, host: str, port: int) -> bool:
        """Whether this session may forward ports; logged either way."""
        target = self._target
        allowed = (
            target is not None
            and target.allow_port_forwarding
            and self._upstream is not None
            and self._lease is not None
            and not self._lease.ended.is_set()
        )
        log.info(
            "ssh session %s: %s %s:%d %s",
            self.session_id,
            what,
            host[:63],
            port,
            "through the host" if allowed else "refused",
        )
        return allowed

    def _over(self, state: str) -> Callable[[str, int], None]:
        """What logs a forward or a listener refused over its cap ("open" or "held")."""

        def refused(what: str, limit: int) -> None:
            """Log what was refused, and the cap."""
            self._refusals.warning(
                "ssh session %s: %s refused, %d %s, the limit", self.session_id, what, limit, state
            )

        return refused

    def _counters(self) -> tuple[Callable[[int], None], Callable[[int], None]]:
        """(count bytes from the agent, count bytes to the agent) into the session's totals."""
        stats = self._stats
        assert stats is not None

        def from_agent(count: int) -> None:
            """Count bytes the agent sent."""
            stats.bytes_from_client += count

        def to_agent(count: int) -> None:
            """Count bytes the agent was sent."""
            stats.bytes_to_client += count

        return from_agent, to_agent

    def _link_agent(self) -> None:
        """Before a channel opens upstream: link to the agent's forwarded agent, if it sent one."""
        if self._agent_link is not None and self._conn is not None:
            try:
                self._agent_link.link(self._conn)
            except OSError as exc:
                log.warning("ssh session %s: agent forwarding failed: %s", self.session_id, exc)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[Tunnel] | bool:
        """direct-tcpip (RFC 4254 section 7.2): opened by the host, if the connection allows."""
        if not self._forwarding("forwarding to", dest_host, dest_port):
            return False
        assert self._upstream is not None
        if not self._forwards.take("forwarded channel"):
            # RFC 4254 section 5.1: refused with a reason the client shows.
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"jitgate: at most {self._forwards.limit} forwarded channels",
            )
        return sshforward.direct(
            self._upstream,
            (dest_host, dest_port),
            (orig_host, orig_port),
            self._counters(),
            self._forwards,
        )

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> Awaitable[asyncssh.SSHListener] | bool:
        """tcpip-forward (RFC 4254 section 7.1): the host listens, if the connection allows."""
        if not self._forwarding("remote forwarding from", listen_host, listen_port):
            return False
        assert self._upstream is not None
        assert self._conn is not None
        # Each listener is a socket held open on the host for as long as the
        # agent likes, and OpenSSH caps none: the cap is ours. A refused
        # request fails without a reason (RFC 4254 section 7.1 has none).
        if not self._listeners.take("host listener"):
            return False
        return sshforward.remote(
            self._upstream,
            self._conn,
            (listen_host, listen_port),
            self._counters(),
            self._forwards,
            self._listeners.once(),
        )
