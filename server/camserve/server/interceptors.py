"""Server interceptors: per-RPC metrics and logs, and the optional bearer-token check.

They sit beside the service, not inside each RPC, so every method is counted, timed and
protected the same way.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from camserve.server.messages import EncodedResponse, serializer
from camserve.server.metrics import Metrics
from camserve.server.parsing import UnparsableRequest, tolerant
from camserve.v1 import explain_pb2 as pb

log = logging.getLogger("camserve.rpc")
# Probes and tooling stay reachable without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# grpc-stubs type handlers for the sync API; the aio ones differ, so they are Any here.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Any]]


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _metadata_of(context: grpc.aio.ServicerContext, key: str) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class WrappedHandlers:
    """An interceptor's wrapped handler per method, built once rather than on every call: the
    wrapping depends only on the method and the handler it wraps (an inner interceptor that
    returns another handler, such as a refusal, gets its own wrapping)."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, wrap: Callable[[str, Any], Any]) -> Any:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(method, handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped


def _code_of(value: int, default: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), default)


def _status(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _code_of(code, default)
    return default


def _replace(
    handler: Any,
    request_deserializer: Any = None,
    response_serializer: Any = None,
    **behaviours: Any,
) -> Any:
    kind = (
        "unary_unary"
        if handler.unary_unary
        else (
            "unary_stream"
            if handler.unary_stream
            else ("stream_unary" if handler.stream_unary else "stream_stream")
        )
    )
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        behaviours[kind],
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=response_serializer or handler.response_serializer,
    )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by status code and logs one line per call at debug level.

    It also reads each ExplainResponse on its way out: unary answers and stream items record
    their stage times, and each stream item is counted by its own status (`ExplainStream.item`).
    Placed outermost, it sees the calls other interceptors refuse too.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._wrapped = WrappedHandlers()

    def _finish(
        self,
        rpc: str,
        code: grpc.StatusCode,
        started: float,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()
        if not log.isEnabledFor(logging.DEBUG):
            return
        request_id = getattr(request, "request_id", "") or _metadata_of(context, "x-request-id")
        log.debug(
            "rpc",
            extra={
                "rpc": rpc,
                "code": code.name,
                "request_id": request_id,
                "ms": round((time.monotonic() - started) * 1000, 2),
            },
        )

    def _observe(self, response: Any) -> None:
        encoded = isinstance(response, EncodedResponse)
        if encoded or (isinstance(response, pb.ExplainResponse) and response.HasField("timing")):
            self._metrics.observe_timing(response.timing)

    def _observe_item(self, response: Any) -> None:
        code = grpc.StatusCode.OK
        if isinstance(response, pb.ExplainResponse) and response.HasField("error"):
            code = _code_of(response.error.code)
        elif not isinstance(response, (pb.ExplainResponse, EncodedResponse)):
            return
        self._metrics.requests.labels("ExplainStream.item", code.name).inc()
        self._observe(response)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, method: str, handler: Any) -> Any:
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return _replace(handler, unary_unary=self._unary(handler.unary_unary, rpc))
        if handler.stream_stream:
            return _replace(handler, stream_stream=self._stream(handler.stream_stream, rpc))
        return handler

    def _unary(self, behaviour: Any, rpc: str) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, code = time.monotonic(), grpc.StatusCode.OK
            try:
                response = await behaviour(request, context)
                self._observe(response)
                return response
            except BaseException:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._finish(rpc, code, started, request, context)

        return unary

    def _stream(self, behaviour: Any, rpc: str) -> Any:
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, code = time.monotonic(), grpc.StatusCode.OK
            try:
                async for response in behaviour(requests, context):
                    self._observe_item(response)
                    yield response
            except BaseException:
                code = _status(context, grpc.StatusCode.CANCELLED)
                raise
            finally:
                self._finish(rpc, code, started, None, context)

        return stream


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (health and reflection stay open)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        presented = _metadata(handler_call_details, "authorization").encode()
        if hmac.compare_digest(presented, self._expected):
            return handler
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if not presented
            else "invalid bearer token"
        )

        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        return _replace(
            handler,
            unary_unary=refuse_unary,
            unary_stream=refuse_stream,
            stream_unary=refuse_unary,
            stream_stream=refuse_stream,
        )


class ParsingInterceptor(grpc.aio.ServerInterceptor):
    """Turns request bytes that do not parse into `UnparsableRequest` values (see `parsing`),
    and lets responses the service serialised itself (`messages.EncodedResponse`) go out as
    they are.

    A unary call carrying an unparsable request is refused here with INVALID_ARGUMENT; stream
    requests reach the service, which answers that one request with INVALID_ARGUMENT and goes on.
    """

    def __init__(self) -> None:
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrapped.get(handler_call_details.method, handler, self._wrap)

    @staticmethod
    def _wrap(method: str, handler: Any) -> Any:
        message_type = method.rsplit("/", 1)[-1] + " request"
        parse = tolerant(handler.request_deserializer, message_type)
        serialize = serializer(handler.response_serializer)
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, UnparsableRequest):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.explain())
                return await behaviour(request, context)

            return _replace(handler, parse, serialize, unary_unary=unary)
        if handler.stream_stream:
            return _replace(handler, parse, serialize, stream_stream=handler.stream_stream)
        return handler
