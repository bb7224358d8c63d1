"""Run the proxy from JITGATE_* settings: agents in over TLS, the core zone over mTLS."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable

import grpc

from jitgate.common import redisconn, tls, wire
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError, Unavailable
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, spiffe_id
from jitgate.common.status import from_rpc_error
from jitgate.proxy import config, upstream
from jitgate.proxy.gate import Gate
from jitgate.proxy.grantcheck import GrantChecker, GrantKeys
from jitgate.proxy.server import Frontend, ProxyServer, agent_tls
from jitgate.proxy.session import Hooks, Redeemed, Registry, Relay, UpstreamSession
from jitgate.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:6432"
CORE_DEADLINE = 3.0
"""Policy records the redemption durably within its own 2 s audit deadline."""


class Core:
    """The proxy's calls into the policy service: keys, redemption, session reports."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = policy_pb2_grpc.PolicyStub(channel)

    async def keys(self) -> policy_pb2.GrantKeys:
        """The current grant-verifying keys."""
        try:
            response: policy_pb2.GrantKeys = await self._stub.GetGrantKeys(
                policy_pb2.GetGrantKeysRequest(), timeout=CORE_DEADLINE
            )
        except grpc.RpcError as exc:
            raise Unavailable("policy", str(from_rpc_error(exc, "policy"))) from exc
        return response

    async def redeem(self, token: str, connection: str, session_id: str, client: str) -> Redeemed:
        """Have policy check the grant again and record its redemption."""
        try:
            response: policy_pb2.RedeemResponse = await self._stub.Redeem(
                policy_pb2.RedeemRequest(
                    grant_token=token,
                    connection=connection,
                    session_id=session_id,
                    client_address=client[:128],
                ),
                timeout=CORE_DEADLINE,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "policy") from exc
        return Redeemed(
            grant_id=response.grant_id,
            subject=response.subject,
            connection=response.connection,
            expires_at=float(response.expires_at.seconds),
        )

    async def report(self, redeemed: Redeemed, session_id: str, relay: Relay) -> None:
        """Tell policy (and so audit) how the session ended."""
        report = policy_pb2.SessionReport(
            grant_id=redeemed.grant_id,
            session_id=session_id,
            connection=redeemed.connection,
            reason=relay.reason,
            bytes_from_client=relay.bytes_from_client,
            bytes_to_client=relay.bytes_to_client,
            opened_at=wire.timestamp(relay.opened_at),
            closed_at=wire.timestamp(time.time()),
        )
        try:
            await self._stub.ReportSession(report, timeout=CORE_DEADLINE)
        except grpc.RpcError as exc:
            # The session is over either way; the operator must see the gap.
            log.error(
                "session %s of grant %s ended (%s) but was not recorded: %s",
                session_id,
                redeemed.grant_id,
                relay.reason,
                from_rpc_error(exc, "policy"),
            )


def frontends(
    env: Env, connections: dict[str, config.Connection], gate: Gate, agents_tls: ssl.SSLContext
) -> list[Frontend]:
    """The listeners for SSH hosts and Kubernetes namespaces, where any are configured."""
    served: list[Frontend] = []
    # Each kind's front end is added here; its listener starts only when
    # connections.toml names a connection of that kind.
    hosts = config.of_kind(connections, config.SshTarget)
    if hosts:
        from jitgate.proxy.ssh import DEFAULT_LISTEN as SSH_LISTEN
        from jitgate.proxy.ssh import SshFrontend

        served.append(
            SshFrontend(
                gate=gate,
                targets=hosts,
                host_key=env.path("JITGATE_PROXY_SSH_HOST_KEY"),
                listen=env.address("JITGATE_PROXY_SSH_LISTEN", SSH_LISTEN),
            )
        )
    namespaces = config.of_kind(connections, config.KubeTarget)
    if namespaces:
        from jitgate.proxy.kube import DEFAULT_LISTEN as KUBE_LISTEN
        from jitgate.proxy.kube import KubeFrontend

        # A context of its own, the same certificate: ALPN offers HTTP/1.1
        # only (RFC 7301), so kubectl does not try HTTP/2, and the PostgreSQL
        # listener's context is left as it is.
        kube_tls = agent_tls(
            env.optional("JITGATE_PROXY_TLS_CERT") or str(env.tls().cert),
            env.optional("JITGATE_PROXY_TLS_KEY") or str(env.tls().key),
        )
        kube_tls.set_alpn_protocols(["http/1.1"])
        served.append(
            KubeFrontend(
                gate=gate,
                targets=namespaces,
                tls=kube_tls,
                listen=env.address("JITGATE_PROXY_KUBE_LISTEN", KUBE_LISTEN),
            )
        )
    return served


def canceller(
    upstreams: dict[str, config.Upstream],
) -> Callable[[str, tuple[int, int]], Awaitable[None]]:
    """Return how to cancel an upstream session's running query, given its backend key."""

    async def cancel(connection: str, key: tuple[int, int]) -> None:
        try:
            await upstream.cancel(upstreams[connection], *key)
        except upstream.UpstreamError as exc:
            raise Unavailable(connection, str(exc)) from exc

    return cancel


def opener(
    upstreams: dict[str, config.Upstream],
) -> Callable[[str, str], Awaitable[UpstreamSession]]:
    """Return how to open the upstream session of a connection, as the proxy's role."""

    async def open_upstream(connection: str, subject: str) -> UpstreamSession:
        conf = upstreams[connection]
        try:
            return await upstream.connect(
                conf,
                read_only=conf.read_only,
                # Who is behind the session, for the server's own views and logs.
                application_name=f"jitgate:{subject}"[:63],
                timeout=5.0,
            )
        except upstream.UpstreamError as exc:
            raise Unavailable(connection, str(exc)) from exc

    return open_upstream


async def serve(env: Env) -> None:
    """Serve agents until SIGTERM or SIGINT."""
    trust_domain = env.string("JITGATE_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN)
    files = env.tls()
    listen = env.address("JITGATE_LISTEN", DEFAULT_LISTEN)
    connections = config.load(env.path("JITGATE_PROXY_CONNECTIONS"))
    upstreams = config.of_kind(connections, config.Upstream)
    cert = env.optional("JITGATE_PROXY_TLS_CERT") or str(files.cert)
    key = env.optional("JITGATE_PROXY_TLS_KEY") or str(files.key)
    try:
        agents_tls = agent_tls(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"JITGATE_PROXY_TLS_CERT/KEY: {exc}") from exc
    channel = tls.secure_channel(
        env.address("JITGATE_POLICY_ADDR"), tls.channel_credentials(files), server_name="policy"
    )
    core = Core(channel)
    redis_url = env.string("JITGATE_REDIS_URL")
    redis_client = redisconn.connect(redis_url)
    checker = GrantChecker(
        keys=GrantKeys(core.keys, time.monotonic),
        redis_client=redis_client,
        audience=env.string("JITGATE_GRANT_AUDIENCE", spiffe_id("proxy", trust_domain)),
        trust_domain=trust_domain,
    )
    registry = Registry()
    gate = Gate(check=checker.check, redeem=core.redeem, report=core.report, registry=registry)
    hooks = Hooks(
        check=checker.check,
        redeem=core.redeem,
        open_upstream=opener(upstreams),
        report=core.report,
        known=upstreams.__contains__,
        tls=agents_tls,
        registry=registry,
        cancel=canceller(upstreams),
    )
    server = ProxyServer(
        hooks=hooks,
        redis_client=redis_client,
        frontends=frontends(env, connections, gate, agents_tls),
    )
    host, _, port = listen.rpartition(":")
    bound = await server.start(host, int(port))
    log.info(
        "proxy on %s:%d for %s; redis %s",
        host,
        bound,
        ", ".join(sorted(upstreams)) or "no PostgreSQL connections",
        redisconn.redacted(redis_url),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
        await channel.close(grace=None)
        await redis_client.aclose()
