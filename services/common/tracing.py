"""A CLIENT span per outgoing RPC, with W3C trace context carried in the call's metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from jitgate.common import telemetry

if TYPE_CHECKING:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor

Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method: object = details.method  # str, or bytes in some grpcio versions
    name = method.decode() if isinstance(method, bytes) else str(method)
    return name.lstrip("/")


def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in telemetry.inject():
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class ClientTracing(_UnaryUnary, _UnaryStream):
    """Trace every call on a channel to peer (a workload name, e.g. "policy")."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def _started(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
        """A CLIENT span for the call, and the call's details carrying its context."""
        method = _method(details)
        service, _, name = method.partition("/")
        span = telemetry.tracer().start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "server.address": self._peer,
            },
        )
        with trace.use_span(span, end_on_exit=False):
            return span, _with_context(details)

    @staticmethod
    def _finish(span: trace.Span, code: grpc.StatusCode) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:  # RPC conventions: any other code fails a client
            span.set_status(trace.StatusCode.ERROR, code.name)
        span.end()

    async def intercept_unary_unary(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Run the call inside a CLIENT span whose context travels with it."""
        span, details = self._started(client_call_details)
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            self._finish(span, exc.code())
        except BaseException:
            self._finish(span, grpc.StatusCode.CANCELLED)
            raise
        else:
            self._finish(span, grpc.StatusCode.OK)
        return call

    async def intercept_unary_stream(
        self,
        continuation: Continuation,  # type: ignore[override]  # the stubs' is sync
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Run the streaming call inside a CLIENT span that ends with the stream."""
        span, details = self._started(client_call_details)
        call = await continuation(details, request)
        # An aio call's code() is a coroutine, so the span ends in a task of its own.
        ending = asyncio.ensure_future(self._end_with(span, call))
        _ENDING.add(ending)
        ending.add_done_callback(_ENDING.discard)
        return call

    async def _end_with(self, span: trace.Span, call: Any) -> None:
        try:
            code = await call.code()
        except BaseException:  # cancelled before it had a status
            code = grpc.StatusCode.CANCELLED
        self._finish(span, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)


_ENDING: set[asyncio.Future[None]] = set()
"""Tasks ending streaming calls' spans, held so they are not collected mid-flight."""
