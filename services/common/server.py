"""Run a jitgate gRPC service: guard, health, TLS, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs predate it

from jitgate.common.errors import ConfigError
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN
from jitgate.common.rpc import ServiceGuard
from jitgate.common.tls import SERVER_OPTIONS

log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]


class Service:
    """One gRPC server with the jitgate guard and grpc.health.v1."""

    def __init__(
        self,
        *,
        name: str,
        listen: str,
        credentials: grpc.ServerCredentials,
        acl: Mapping[str, frozenset[str]] | None,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        cleanup: Sequence[Cleanup] = (),
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        self.name = name
        self.listen = listen
        self._credentials = credentials
        self._service_names = tuple(service_names)
        self._cleanup = tuple(cleanup)
        self._server = grpc.aio.server(
            interceptors=[ServiceGuard(acl, trust_domain=trust_domain)], options=SERVER_OPTIONS
        )
        register(self._server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = 0

    async def start(self) -> int:
        """Bind, start serving, report SERVING; return the bound port."""
        try:
            self.port = self._server.add_secure_port(self.listen, self._credentials)
        except RuntimeError as exc:
            raise ConfigError(f"{self.name} cannot listen on {self.listen}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"{self.name} cannot listen on {self.listen}")
        await self._server.start()
        for service in ("", *self._service_names):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s", self.name, self.listen)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, finish calls in flight within grace, release resources."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        for cleanup in self._cleanup:
            await cleanup()
        log.info("%s stopped", self.name)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        await stopping.wait()
        await self.stop()
