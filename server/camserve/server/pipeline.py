"""The explain pipeline: the CPU side of a request, between the servicer and the models.

One request travels: admission for its whole cost (`backend.ModelBackend.admit`) -> prepare its
images on CPU threads (JPEGs on the GPU for CUDA models in one process) -> the backend batches
them with every other request's, runs the engine and the forward-only work its methods and
scores need -> shape each image's result and build the answer from the `ExplainOutcome` on CPU
threads (one hop for a one-image request). Every refusal leaves as one of the domain errors of
`camserve.server.errors`; batcher, engine and device failures become domain errors through
`faults.service_error` alone, which tells refusals apart from faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from camserve.server.backend import ModelBackend
from camserve.server.device_jpeg import is_jpeg, prepare_jpegs
from camserve.server.engine import MapScores, RowResult
from camserve.server.engine.shaping import output_bytes
from camserve.server.errors import InvalidRequest, Unavailable
from camserve.server.inspect_outputs import shaping_bytes
from camserve.server.kernels import KernelCatalogue, KernelQuery, KernelView
from camserve.server.metrics import Metrics, StageClock, untimed
from camserve.server.outputs import RESOLUTION_NAMES, explain_image
from camserve.server.preprocess import (
    PreparedImage,
    decode_for_model,
    from_normalised_array,
    from_uint8_array,
    prepare,
)
from camserve.server.records import (
    ArrayImage,
    EncodedImage,
    ExplainOutcome,
    ImageExplanation,
    ImageSource,
    ModelMeta,
    ModelStatus,
    StageTimes,
)
from camserve.server.settings import LimitsSettings, Settings
from camserve.server.validation import ExplainPlan, check_response_size
from camserve.v1.tensors import dtype_name

log = logging.getLogger("camserve.pipeline")
R = TypeVar("R")


def prepare_image(
    source: ImageSource,
    meta: ModelMeta,
    limits: LimitsSettings,
    keep_original: bool,
    timed: StageClock = untimed,
) -> PreparedImage:
    """Decodes or unpacks one image and makes the model input (runs on a worker thread)."""
    with timed("decode"):
        if isinstance(source, ArrayImage):
            if source.normalised:
                return from_normalised_array(
                    source.array,
                    source.field,
                    meta.recipe,
                    keep_original,
                    channels_last=meta.channels_last_input,
                )
            image = from_uint8_array(source.array, source.field, limits, meta.recipe)
            size = None
        else:
            # An overlay is drawn on the photo at its own size: only images without one are
            # decoded at a reduced scale.
            decoded = decode_for_model(
                source.data, source.field, limits, meta.recipe, reduce=not keep_original
            )
            image, size = decoded.image, decoded.original_size
    with timed("preprocess"):
        return prepare(image, meta.recipe, keep_original, size)


def check_allocation(
    plan: ExplainPlan, prepared: Sequence[PreparedImage], meta: ModelMeta, limit: int
) -> None:
    """Refuses, before compute, a request whose heatmaps would take more than `limit` bytes to
    shape (every intermediate counted, see `output_bytes`)."""
    _, feature_h, feature_w = meta.layer_shapes[plan.layer]
    crop = meta.recipe.crop
    output = plan.output
    total = 0
    pixel_maps = plan.budget.pixel_maps_per_image or (0,) * len(prepared)
    for maps, pixel, item in zip(plan.budget.maps_per_image, pixel_maps, prepared, strict=True):
        # Pixel maps are at the input's resolution (3xHxW when raw) wherever a CAM is at the
        # layer's.
        for count, feature_hw in (
            (maps - pixel, (feature_h, feature_w)),
            (pixel * (3 if output.raw else 1), (crop, crop)),
        ):
            total += output_bytes(
                item.geometry,
                RESOLUTION_NAMES[output.resolution],
                output.size,
                dtype_name(output.dtype),
                count,
                feature_hw,
                overlay=output.overlay and count == maps - pixel,
            )
        total += shaping_bytes(plan.inspect, item.geometry, meta)
    if total > limit:
        raise InvalidRequest(
            f"output: shaping these heatmaps would take about {total / 2**20:.0f} MiB, over the "
            f"server's limit of {limit / 2**20:.0f} MiB per request; ask for fewer images, "
            "classes or methods, a smaller resolution, or dtype uint8"
        )


@dataclass(frozen=True)
class _Answer:
    """A computed request's images, shaped and built into its answer on CPU threads."""

    meta: ModelMeta
    plan: ExplainPlan
    prepared: list[PreparedImage]
    results: list[RowResult]
    scores: list[dict[tuple[str, int], MapScores]]
    times: StageTimes
    arrived: float
    timed: StageClock

    def shape(self, index: int) -> ImageExplanation:
        return explain_image(
            self.results[index],
            self.prepared[index],
            self.plan,
            self.meta,
            self.scores[index],
            timed=self.timed,
        )

    def finish(
        self, images: Sequence[ImageExplanation], batch_size: int, respond: Callable[..., R]
    ) -> R:
        outcome = ExplainOutcome(
            model=self.meta.name,
            model_version=self.meta.version,
            images=tuple(images),
            times=dataclasses.replace(self.times, total_s=time.monotonic() - self.arrived),
            batch_size=batch_size,
        )
        with self.timed("respond"):
            return respond(outcome)

    async def send(
        self, pool: ThreadPoolExecutor, batch_size: int, respond: Callable[[ExplainOutcome], R]
    ) -> R:
        """`respond(outcome)` on a worker thread: one hop for a one-image request."""
        loop = asyncio.get_running_loop()
        if len(self.prepared) == 1:
            return await loop.run_in_executor(
                pool, lambda: self.finish([self.shape(0)], batch_size, respond)
            )
        count = len(self.prepared)
        shaped = await asyncio.gather(
            *(loop.run_in_executor(pool, self.shape, index) for index in range(count))
        )
        return await loop.run_in_executor(pool, self.finish, shaped, batch_size, respond)


class ExplainPipeline:
    """Runs explain requests for the models of a backend; see the module docstring."""

    def __init__(
        self,
        backend: ModelBackend,
        settings: Settings,
        pool: ThreadPoolExecutor,
        metrics: Metrics,
        device_decode: bool = True,
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self._pool = pool
        self._limits = settings.limits
        self._max_bytes = settings.max_message_bytes
        self._kernels = KernelCatalogue(pool)
        # JPEGs of CUDA models are decoded on the device, where this process holds the model.
        self._device_decode = device_decode

    def statuses(self) -> list[ModelStatus]:
        """Every hosted model, loaded or not, in configuration order."""
        return self._backend.statuses()

    def status(self, name: str) -> ModelStatus:
        """The named model, loaded or not; ModelNotFound when it is not hosted."""
        return self._backend.status(name)

    def model(self, name: str) -> ModelMeta:
        """The named (or default) model, ready to explain; else ModelNotFound or Unavailable."""
        status = self._backend.status(name)
        if status.meta is None:
            raise Unavailable(f"model {status.name!r} is still loading; retry")
        return status.meta

    async def kernels(self, query: KernelQuery) -> KernelView:
        """A conv layer's weights and grid page (`camserve.server.kernels`); no pass runs."""
        model = self._backend.status(query.model).name
        return await self._kernels.view(query, functools.partial(self._backend.conv_weights, model))

    async def explain(
        self,
        meta: ModelMeta,
        plan: ExplainPlan,
        sources: Sequence[ImageSource],
        deadline: float | None,
        respond: Callable[[ExplainOutcome], R],
    ) -> R:
        """Prepares, computes and shapes one request and returns `respond(outcome)`, which runs
        on a worker thread (building the answer message there keeps it off the event loop);
        raises a ServiceError when refused."""
        arrived = time.monotonic()
        timed = functools.partial(self._metrics.cpu_time, meta.name)
        async with self._backend.admit(meta, plan) as admission:
            prepared = await self._prepare(sources, meta, plan, timed)
            check_response_size(plan, [item.geometry for item in prepared], meta, self._max_bytes)
            check_allocation(plan, prepared, meta, self._limits.max_request_output_bytes)
            preprocessed = time.monotonic()
            computed = await admission.compute([item.pixels for item in prepared], deadline)
        times = StageTimes(
            queue_s=computed.queue_s,
            preprocess_s=preprocessed - arrived,
            compute_s=computed.compute_s,
            total_s=0.0,  # set when the answer is built
        )
        answer = _Answer(
            meta, plan, prepared, computed.results, computed.scores, times, arrived, timed
        )
        return await answer.send(self._pool, computed.batch_size, respond)

    async def _prepare(
        self,
        sources: Sequence[ImageSource],
        meta: ModelMeta,
        plan: ExplainPlan,
        timed: StageClock,
    ) -> list[PreparedImage]:
        """Each image's model input, on CPU threads in parallel; on a CUDA model the request's
        JPEGs are decoded together on the device first (`device_jpeg`), and any it cannot
        decode take the CPU path."""
        loop = asyncio.get_running_loop()
        keep = plan.output.overlay
        on_device: dict[int, PreparedImage] = {}
        if self._device_decode and meta.device.startswith("cuda") and not keep:
            jpegs = [
                (index, source)
                for index, source in enumerate(sources)
                if isinstance(source, EncodedImage) and is_jpeg(source.data)
            ]
            if jpegs:
                decoded = await loop.run_in_executor(
                    self._pool, self._decode_on_device, [s for _, s in jpegs], meta, timed
                )
                on_device = {
                    index: item
                    for (index, _), item in zip(jpegs, decoded, strict=True)
                    if item is not None
                }
        rest = {
            index: loop.run_in_executor(
                self._pool, prepare_image, source, meta, self._limits, keep, timed
            )
            for index, source in enumerate(sources)
            if index not in on_device
        }
        done = dict(zip(rest, await asyncio.gather(*rest.values()), strict=True))
        return [on_device[i] if i in on_device else done[i] for i in range(len(sources))]

    def _decode_on_device(
        self, sources: list[EncodedImage], meta: ModelMeta, timed: StageClock
    ) -> list[PreparedImage | None]:
        with timed("decode"):
            items = [(source.data, source.field) for source in sources]
            return prepare_jpegs(items, meta.recipe, self._limits, torch.device(meta.device))
