"""The ExplainService over gRPC: protocol work only, no torch.

Each RPC converts its request into domain terms (`validation`), delegates to the explain
pipeline, and converts the answer back (`messages`). Every refusal is a domain error mapped to
a status code through `STATUS_CODES`; the unary RPC aborts with it, the stream RPC answers that
one request with an `Error` and goes on. Shutdown drains: requests not yet started are refused
with UNAVAILABLE while started ones finish.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from camserve.server import messages
from camserve.server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    ServerFault,
    ServiceError,
    Unavailable,
    server_fault,
)
from camserve.server.kernels import kernel_query
from camserve.server.parsing import UnparsableRequest
from camserve.server.settings import LimitsSettings
from camserve.server.streams import answer_stream
from camserve.server.validation import image_sources, validate
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from camserve.server.pipeline import ExplainPipeline

# What the RPCs answer: a response the worker thread already serialised, or (for refusals on a
# stream) a small message gRPC serialises.
Answer = messages.EncodedResponse | pb.ExplainResponse

STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ServerFault: grpc.StatusCode.INTERNAL,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    """The status code of a domain error (its nearest class in `STATUS_CODES`)."""
    for kind in type(error).__mro__:
        if kind in STATUS_CODES:
            return STATUS_CODES[kind]
    return grpc.StatusCode.INTERNAL


class ExplainServicer(pb_grpc.ExplainServiceServicer):
    """Implements camserve.v1.ExplainService on top of an `ExplainPipeline`."""

    def __init__(
        self,
        pipeline: ExplainPipeline,
        limits: LimitsSettings,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self._pipeline = pipeline
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Ids for requests that bring none: unique per server (a random prefix, then a count),
        # without a call to the OS's random source per request as uuid4 makes.
        prefix, count = uuid.uuid4().hex[:16], itertools.count()
        self._new_id = lambda: f"{prefix}-{next(count)}"

    def begin_drain(self) -> None:
        """From now on requests not yet started are refused with UNAVAILABLE (retryable)."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Waits until every started request has been answered."""
        await self._idle.wait()

    async def answer(self, request: pb.ExplainRequest, time_remaining: float | None) -> Answer:
        """One request's response, serialised on a worker thread, counted so that shutdown can
        wait for it. The RPCs and the HTTP API (`camserve.server.web`) both answer through it,
        so every front end validates, drains and refuses alike; raises a ServiceError."""
        if self._draining:
            raise Unavailable(
                "server is shutting down and starts no new work; retry on another replica"
            )
        if isinstance(request, UnparsableRequest):  # a stream request whose bytes did not parse
            raise InvalidRequest(request.explain())
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._active += 1
        self._idle.clear()
        try:
            meta = self._pipeline.model(request.model)
            plan = validate(request, meta, self._limits)
            respond = functools.partial(
                messages.encoded_response, request.request_id or self._new_id()
            )
            return await self._pipeline.explain(
                meta, plan, image_sources(request), deadline, respond
            )
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still get a precise status
            raise server_fault(exc) from exc
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> Answer:
        try:
            return await self.answer(request, context.time_remaining())
        except ServiceError as error:
            code = status_code(error)
            trailers = messages.retry_trailers(code.value[0], error.message, error.retry_after_s)
            await context.abort(code, error.message, trailers)
            raise  # unreachable: abort raises

    async def ExplainStream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Answer]:

        async def answer(request: pb.ExplainRequest) -> Answer:
            return await self.answer(request, context.time_remaining())

        def fail(request: pb.ExplainRequest, exc: Exception) -> Answer:
            error = exc if isinstance(exc, ServiceError) else server_fault(exc)
            return messages.error_response(
                request.request_id or self._new_id(),
                status_code(error).value[0],
                error.message,
                error.retry_after_s,
            )

        async for response in answer_stream(
            request_iterator, answer, fail, self._limits.stream_window
        ):
            yield response

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[messages.model_info(status) for status in self._pipeline.statuses()]
        )

    async def GetModel(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            return messages.model_info(self._pipeline.status(request.name))
        except ModelNotFound as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error.message)
            raise

    async def kernels(self, request: pb.GetKernelsRequest) -> pb.GetKernelsResponse:
        """A conv layer's weights and grid page (the GetKernels RPC, and HTTP's kernels
        endpoint); raises a ServiceError when refused."""
        try:
            meta = self._pipeline.model(request.model)
            query = kernel_query(request, meta, self._limits, self._max_message_bytes)
            return messages.kernels_response(await self._pipeline.kernels(query))
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still get a precise status
            raise server_fault(exc, request.model) from exc

    async def GetKernels(  # noqa: N802 - gRPC method name
        self, request: pb.GetKernelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetKernelsResponse:
        try:
            return await self.kernels(request)
        except ServiceError as error:
            await context.abort(status_code(error), error.message)
            raise  # unreachable: abort raises
