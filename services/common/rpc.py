"""The server interceptor every jitgate service runs: caller allow-lists and statuses.

Handlers stay thin: this guard checks the caller's mTLS identity per RPC against
an allow-list (deny by default), turns undecodable requests into
INVALID_ARGUMENT, and maps every JitgateError to its status in one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context as TraceContext

from jitgate.common import telemetry
from jitgate.common.errors import JitgateError, Unauthenticated, Unavailable
from jitgate.common.identity import DEFAULT_TRUST_DOMAIN, peer_workload
from jitgate.common.status import to_status

log = logging.getLogger(__name__)

caller: contextvars.ContextVar[str] = contextvars.ContextVar("jitgate_caller", default="")
"""The workload name of the current RPC's mTLS peer, set by ServiceGuard."""

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
REFLECTION_METHODS = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
ANY_WORKLOAD = "*"
"""An allow-list entry that admits any certificate our CA issued."""

# The grpc stubs describe the synchronous server's handler shapes; under
# grpc.aio the behaviours are coroutines and async generators, so handlers and
# contexts are handled as Any inside this module only.
Handler = Any
Context = Any

ServicerContext = grpc.aio.ServicerContext[Any, Any]
"""What servicers annotate their context with."""


class _Malformed:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, size: int, error: Exception) -> None:
        self.size = size
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # any decode failure is the sender's fault
            return _Malformed(len(data), exc)

    return deserialize


def _log_error(method: str, who: str, exc: JitgateError) -> None:
    if isinstance(exc, Unauthenticated):
        log.info("%s from %s: unauthenticated (%s)", method, who, exc)
    elif isinstance(exc, Unavailable):
        log.warning("%s from %s: failing closed, %s", method, who, exc)
    else:
        log.info("%s from %s: %s %s", method, who, type(exc).__name__, exc)


# OpenTelemetry's RPC conventions: the codes that are a server's own failure.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_DURATION = telemetry.meter().create_histogram(
    "rpc.server.duration", unit="ms", description="Time to serve an RPC, by method and status"
)


async def _fail(method: str, who: str, context: Context, exc: Exception) -> None:
    """End an RPC whose handler raised: its status if a JitgateError, else INTERNAL, logged."""
    if isinstance(exc, JitgateError):
        _log_error(method, who, exc)
        await context.abort_with_status(to_status(exc))
    else:
        # A bug, never bad input: bad input raises a JitgateError.
        log.error("%s from %s: unexpected error", method, who, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _record_duration(method: str, code: grpc.StatusCode, started: float) -> None:
    if telemetry.exporting_metrics():
        _DURATION.record(
            (time.perf_counter() - started) * 1000,
            {"rpc.method": method.lstrip("/"), "rpc.grpc.status_code": code.value[0]},
        )


def _status_code(context: Context) -> grpc.StatusCode:
    """The status the RPC ended with (OK unless the handler or the guard set another)."""
    try:
        code = context.code()
    except Exception:  # an aio context without code() (older grpcio): unknown is OK
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if code is None else grpc.StatusCode.UNKNOWN


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class ServiceGuard(_Interceptor):
    """Allow-list callers per RPC and translate errors into statuses.

    acl maps a full method name to the workload names that may call it. None
    means the server does not use client certificates (the agent-facing
    issuer), so only error mapping applies.
    """

    def __init__(
        self,
        acl: Mapping[str, frozenset[str]] | None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        self._acl = dict(acl) if acl is not None else None
        if self._acl is not None:
            for method in HEALTH_METHODS:
                self._acl.setdefault(method, frozenset({ANY_WORKLOAD}))
        self._trust_domain = trust_domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """Wrap the handler for this call with the identity check and error mapping."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if method in REFLECTION_METHODS and self._acl is None:
            # Reflection describes the public API and nothing else; it is the one
            # streaming RPC served, and only where any client may call anyway.
            return handler
        return self._wrap(method, handler)

    async def _admit(self, method: str, context: Context, request: Any) -> str:
        """Return the caller's workload name, or abort the RPC."""
        who = ""
        if self._acl is not None:
            who = peer_workload(context.auth_context(), self._trust_domain) or ""
            allowed = self._acl.get(method, frozenset())
            if not who or (who not in allowed and ANY_WORKLOAD not in allowed):
                log.warning("%s: caller %r is not on the allow-list", method, who or "unknown")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller not allowed")
        if isinstance(request, _Malformed):
            log.info("%s from %s: undecodable request of %d bytes", method, who, request.size)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        return who

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # jitgate has no client-streaming RPCs; refuse rather than run unguarded.
        return grpc.unary_unary_rpc_method_handler(self._refuse(method))

    def _refuse(self, method: str) -> Callable[[Any, Context], Awaitable[None]]:
        async def refuse(_request: Any, context: Context) -> None:
            log.warning("%s: client-streaming RPCs are not served", method)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not implemented")

        return refuse

    @contextlib.contextmanager
    def _observed(self, method: str, context: Context) -> Iterator[None]:
        """A SERVER span and a duration sample for one RPC, with its status code."""
        started = time.perf_counter()
        if not telemetry.exporting_traces():
            try:
                yield
            finally:
                _record_duration(method, _status_code(context), started)
            return
        service, _, name = method.lstrip("/").partition("/")
        remote = telemetry.extract(context.invocation_metadata())
        if self._acl is not None:
            # mTLS callers are our own workloads: their span is this one's parent,
            # which is what makes one grant one trace.
            parent, links = remote, []
        else:
            # An agent's trace context must not shape ours (it could splice our
            # spans into someone else's trace): a new trace, linked to theirs.
            remote_span = trace.get_current_span(remote).get_span_context()
            parent, links = (
                TraceContext(),
                [trace.Link(remote_span)] if remote_span.is_valid else [],
            )
        with telemetry.tracer().start_as_current_span(
            method.lstrip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            links=links,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            finally:
                code = _status_code(context)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in SERVER_ERRORS:
                    span.set_status(trace.StatusCode.ERROR, code.name)
                _record_duration(method, code, started)

    def _unary(
        self, method: str, behaviour: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def guarded(request: Any, context: Context) -> Any:
            with self._observed(method, context):
                who = await self._admit(method, context, request)
                token = caller.set(who)
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(method, who, context, exc)
                finally:
                    caller.reset(token)

        return guarded

    def _streaming(
        self, method: str, behaviour: Callable[[Any, Context], Any]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            with self._observed(method, context):
                who = await self._admit(method, context, request)
                # gRPC runs each RPC in its own task, so this value ends with it.
                caller.set(who)
                try:
                    produced = behaviour(request, context)
                    if inspect.isasyncgen(produced):
                        async for item in produced:
                            yield item
                    else:
                        await produced
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(method, who, context, exc)

        return guarded
