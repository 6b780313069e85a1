"""The ExplainService: converts, validates, delegates to a model's batcher, and answers.

Every failure becomes a `Refusal` with a precise status code and a message naming the field; the
unary RPC aborts with it, the stream RPC answers that one request with an `Error` and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import grpc
import torch
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from camserve.server.batcher import BatcherClosed, DeadlineExpired, QueueFull
from camserve.server.engine import EngineError, RowRequest
from camserve.server.metrics import Metrics
from camserve.server.preprocess import (
    ImageError,
    PreparedImage,
    decode,
    from_normalised_array,
    from_uint8_array,
    prepare,
)
from camserve.server.registry import ModelRegistry, UnknownModel
from camserve.server.responses import image_result
from camserve.server.runtime import Computed, ImageJob, ModelMeta, ModelRuntime
from camserve.server.settings import Settings
from camserve.server.validation import (
    METHOD_ENUMS,
    RequestError,
    check_response_size,
    validate,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import TensorFormatError, from_proto

log = logging.getLogger("camserve.servicer")
STREAM_IN_FLIGHT = 64  # requests of one stream being worked on at once; more wait to be read


@dataclass(frozen=True)
class Refusal(Exception):
    """A request the server answers with a non-OK status."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float = 0.0

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """A google.rpc.RetryInfo detail for RESOURCE_EXHAUSTED, the standard retry hint."""
        if not self.retry_after_s:
            return ()
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                nanos=int(self.retry_after_s * 1e9) % 10**9, seconds=int(self.retry_after_s)
            )
        )
        detail = any_pb2.Any()
        detail.Pack(retry)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return tuple(rpc_status.to_status(status).trailing_metadata)


def _prepare_image(
    image: pb.Image, field: str, meta: ModelMeta, max_pixels: int, keep_original: bool
) -> PreparedImage:
    """Decodes or unpacks one image and makes the model input (runs on a worker thread)."""
    if image.WhichOneof("source") == "encoded":
        return prepare(
            decode(image.encoded, f"{field}.encoded", max_pixels), meta.recipe, keep_original
        )
    tensor_field = f"{field}.tensor"
    try:
        array = from_proto(image.tensor, tensor_field)
    except TensorFormatError as exc:
        raise ImageError(str(exc)) from None
    if image.tensor.dtype == pb.DTYPE_UINT8:
        return prepare(
            from_uint8_array(array, tensor_field, max_pixels), meta.recipe, keep_original
        )
    if image.tensor.dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return from_normalised_array(array, tensor_field, meta.recipe, keep_original)
    raise ImageError(
        f"{tensor_field}.dtype: images travel as uint8 HxWx3 or float32 3xHxW, not "
        f"{pb.DType.Name(image.tensor.dtype)}"
    )


class ExplainServicer(pb_grpc.ExplainServiceServicer):
    """Implements camserve.v1.ExplainService on top of the model registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._registry = registry
        self._limits = settings.limits
        self._metrics = metrics
        self._pool = pool
        self._max_bytes = settings.max_message_bytes
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin_drain(self) -> None:
        """From now on requests not yet started are refused with UNAVAILABLE (retryable)."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Waits until every started request has been answered."""
        await self._idle.wait()

    async def _explain_tracked(
        self, request: pb.ExplainRequest, time_remaining: float | None
    ) -> pb.ExplainResponse:
        """`_explain`, counted so that shutdown can wait for every started request."""
        if self._draining:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                "server is shutting down and starts no new work; retry on another replica",
            )
        self._active += 1
        self._idle.clear()
        try:
            return await self._explain(request, time_remaining)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    def _runtime(self, name: str) -> ModelRuntime:
        try:
            runtime = self._registry.get(name)
        except UnknownModel as exc:
            raise Refusal(grpc.StatusCode.NOT_FOUND, exc.args[0]) from None
        if not runtime.ready:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE, f"model {runtime.spec.name!r} is still loading; retry"
            )
        return runtime

    async def _explain(
        self, request: pb.ExplainRequest, time_remaining: float | None
    ) -> pb.ExplainResponse:
        arrived = time.monotonic()
        deadline = None if time_remaining is None else arrived + time_remaining
        runtime = self._runtime(request.model)
        meta = runtime.meta
        try:
            plan = validate(request, meta, self._limits)
        except RequestError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            prepared = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._pool,
                        _prepare_image,
                        image,
                        f"images[{i}]",
                        meta,
                        self._limits.max_pixels,
                        plan.output.overlay,
                    )
                    for i, image in enumerate(request.images)
                )
            )
        except ImageError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            check_response_size(plan, [item.geometry for item in prepared], meta, self._max_bytes)
        except RequestError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        preprocessed = time.monotonic()
        jobs = [
            ImageJob(
                tensor=item.tensor,
                row=RowRequest(
                    layer=plan.layer,
                    methods=plan.methods,
                    classes=target.classes,
                    top_k=target.top_k,
                ),
            )
            for item, target in zip(prepared, plan.targets, strict=True)
        ]
        computed = await self._submit(runtime, jobs, deadline)
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self._pool, image_result, c.result, item, plan, meta)
                for c, item in zip(computed, prepared, strict=True)
            )
        )
        done = time.monotonic()
        timing = pb.Timing(
            queue_ms=1000 * max(c.batch.queue_s for c in computed),
            preprocess_ms=1000 * (preprocessed - arrived),
            compute_ms=1000 * max(c.compute_s for c in computed),
            total_ms=1000 * (done - arrived),
        )
        self._observe(timing)
        return pb.ExplainResponse(
            request_id=request.request_id or uuid.uuid4().hex,
            model=meta.name,
            model_version=meta.version,
            results=results,
            timing=timing,
            batch_size=max(c.batch.size for c in computed),
        )

    async def _submit(
        self, runtime: ModelRuntime, jobs: list[ImageJob], deadline: float | None
    ) -> list[Computed]:
        name = runtime.spec.name
        try:
            return await runtime.explain(jobs, deadline)
        except QueueFull as exc:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {name!r} is overloaded: its queue holds {exc.depth} of {exc.capacity} "
                f"images; retry after {exc.retry_after_s:.2f}s or lower your request rate",
                retry_after_s=exc.retry_after_s,
            ) from None
        except DeadlineExpired:
            raise Refusal(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline passed while waiting in model {name!r}'s queue; the image was not "
                "computed. Allow more time or send fewer concurrent requests",
            ) from None
        except BatcherClosed as exc:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except EngineError as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except torch.OutOfMemoryError:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {name!r} ran out of device memory on a single image; send a smaller one",
                retry_after_s=1.0,
            ) from None

    def _observe(self, timing: pb.Timing) -> None:
        for stage in ("queue", "preprocess", "compute", "total"):
            self._metrics.latency.labels(stage).observe(getattr(timing, f"{stage}_ms") / 1000.0)

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        try:
            return await self._explain_tracked(request, context.time_remaining())
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message, refusal.trailing_metadata())
            raise  # unreachable: abort raises

    async def ExplainStream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainResponse]:
        responses: asyncio.Queue[pb.ExplainResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ExplainRequest) -> None:
            request_id = request.request_id or uuid.uuid4().hex
            try:
                response = await self._explain_tracked(request, context.time_remaining())
                response.request_id = request_id
            except Refusal as refusal:
                self._metrics.requests.labels("ExplainStream.item", refusal.code.name).inc()
                response = pb.ExplainResponse(
                    request_id=request_id,
                    error=pb.Error(
                        code=refusal.code.value[0],
                        message=refusal.message,
                        retry_after_s=refusal.retry_after_s,
                    ),
                )
            finally:
                slots.release()
            await responses.put(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    def _model_info(self, runtime: ModelRuntime) -> pb.ModelInfo:
        spec = runtime.spec
        info = pb.ModelInfo(
            name=spec.name,
            version=spec.version,
            ready=runtime.ready,
            max_batch_size=spec.max_batch_size,
        )
        if not runtime.ready:
            return info
        meta = runtime.meta
        info.device = meta.device
        info.input.CopyFrom(
            pb.InputSpec(
                height=meta.recipe.crop,
                width=meta.recipe.crop,
                resize=meta.recipe.resize,
                center_crop=bool(meta.recipe.resize),
                mean=meta.recipe.mean,
                std=meta.recipe.std,
            )
        )
        info.num_classes = meta.num_classes
        info.labels.extend(meta.labels)
        info.default_layer = meta.default_layer
        info.layers.extend(
            pb.LayerInfo(name=layer.name, output_shape=layer.shape) for layer in meta.layers
        )
        info.methods.extend(cast("list[pb.Method]", list(METHOD_ENUMS.values())))
        return info

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self._model_info(runtime) for runtime in self._registry]
        )

    async def GetModel(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            runtime = self._registry.get(request.name)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
            raise
        return self._model_info(runtime)
