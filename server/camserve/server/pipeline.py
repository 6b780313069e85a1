"""The explain pipeline: the torch side of the seam between the servicer and the engine.

One request travels: admission for its whole cost -> prepare its images on CPU threads (JPEGs
on the GPU for CUDA models) -> submit them together to the model's batcher -> the forward-only
work its methods and scores need, through the same batcher (`followups`) -> shape each image's
result and build the answer from the `ExplainOutcome` on CPU threads (one hop for a one-image
request). Every refusal leaves as one of the domain errors of `camserve.server.errors`; batcher,
engine and device failures become domain errors through `faults.service_error` alone, which
tells refusals apart from faults.
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

from camserve.server import followups
from camserve.server.batcher import Reservation
from camserve.server.device_jpeg import is_jpeg, prepare_jpegs
from camserve.server.engine import (
    MapScores,
    RowRequest,
    RowResult,
)
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.registry import pass_methods
from camserve.server.engine.shaping import output_bytes
from camserve.server.engine.types import ATTRIBUTIONS
from camserve.server.errors import InvalidRequest, ModelNotFound, Unavailable
from camserve.server.faults import service_error
from camserve.server.followups import explain_row_cost
from camserve.server.inspect_outputs import row_inspection, shaping_bytes
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
from camserve.server.registry import ModelRegistry, UnknownModel
from camserve.server.runtime import Computed, ModelRuntime
from camserve.server.settings import LimitsSettings, Settings
from camserve.server.validation import ExplainPlan, check_response_size
from camserve.server.work import ImageJob
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
                return from_normalised_array(source.array, source.field, meta.recipe, keep_original)
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


def _gradient_free(plan: ExplainPlan) -> bool:
    return plan.budget.rows_after_pass


def _keeps_input(plan: ExplainPlan) -> bool:
    """Whether rows after the pass need the explain row's activations or staged input."""
    return _gradient_free(plan) or bool(plan.scores) or bool(plan.budget.gradient_rows)


async def _tail_fraction(runtime: ModelRuntime, plan: ExplainPlan) -> float:
    """What a row after the layer costs; only methods running the tail measure one."""
    if not plan.budget.tail_methods:
        return 1.0
    return await runtime.tail_fraction(plan.layer)


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
    """Runs explain requests for the models of a registry; see the module docstring."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        pool: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._pool = pool
        self._limits = settings.limits
        self._max_bytes = settings.max_message_bytes
        self._kernels = KernelCatalogue(pool)

    def statuses(self) -> list[ModelStatus]:
        """Every hosted model, loaded or not, in configuration order."""
        return [self._status(runtime) for runtime in self._registry]

    def status(self, name: str) -> ModelStatus:
        """The named model, loaded or not; ModelNotFound when it is not hosted."""
        return self._status(self._runtime(name))

    def model(self, name: str) -> ModelMeta:
        """The named (or default) model, ready to explain; else ModelNotFound or Unavailable."""
        runtime = self._runtime(name)
        if not runtime.ready:
            raise Unavailable(f"model {runtime.spec.name!r} is still loading; retry")
        return runtime.meta

    async def kernels(self, query: KernelQuery) -> KernelView:
        """A conv layer's weights and grid page (`camserve.server.kernels`); no pass runs."""
        runtime = self._runtime(query.model)
        return await self._kernels.view(
            query, functools.partial(runtime.conv_weights, pool=self._pool)
        )

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
        runtime = self._runtime(meta.name)
        timed = functools.partial(self._metrics.cpu_time, meta.name)
        try:  # admission first: a refused request costs no decoding
            reservation = runtime.reserve(await self._cost(runtime, meta, plan))
        except Exception as exc:  # noqa: BLE001 - translated into the domain error
            raise service_error(exc, meta.name) from None
        with reservation:
            prepared = await self._prepare(sources, meta, plan, timed)
            check_response_size(plan, [item.geometry for item in prepared], meta, self._max_bytes)
            check_allocation(plan, prepared, meta, self._limits.max_request_output_bytes)
            preprocessed = time.monotonic()
            computed = await self._compute(
                runtime, self._jobs(prepared, plan), deadline, reservation
            )
            follow_up_started = time.monotonic()
            results, scores = await self._follow_up(
                runtime, meta, plan, [c.result for c in computed], deadline, reservation
            )
            follow_up_s = time.monotonic() - follow_up_started
        times = StageTimes(
            queue_s=max(c.batch.queue_s for c in computed),
            preprocess_s=preprocessed - arrived,
            compute_s=max(c.compute_s for c in computed) + follow_up_s,
            total_s=0.0,  # set when the answer is built
        )
        answer = _Answer(meta, plan, prepared, results, scores, times, arrived, timed)
        batch_size = max(c.batch.size for c in computed)
        return await answer.send(self._pool, batch_size, respond)

    async def _cost(self, runtime: ModelRuntime, meta: ModelMeta, plan: ExplainPlan) -> int:
        """The request's cost in forward passes: its images, plus the rows of gradient-free
        methods and scores when it asks for them."""
        if not _keeps_input(plan):
            return len(plan.targets) * explain_rows(plan.aug_smooth) * explain_row_cost(plan)
        try:
            fraction = await _tail_fraction(runtime, plan)
        except Exception as exc:  # noqa: BLE001 - e.g. a layer the tail cannot be measured at
            raise service_error(exc, meta.name) from None
        return followups.request_cost(plan, tail_fraction=fraction, chunk=meta.max_batch_size)

    async def _follow_up(
        self,
        runtime: ModelRuntime,
        meta: ModelMeta,
        plan: ExplainPlan,
        results: list[RowResult],
        deadline: float | None,
        reservation: Reservation,
    ) -> tuple[list[RowResult], list[dict[tuple[str, int], MapScores]]]:
        """Runs the request's forward-only work: the maps of methods made by rows after the
        pass, then the scores of all its maps. Plans are built and finished on the model's
        worker thread, where the tensors the explain pass left on the device live."""
        chunk = meta.max_batch_size
        no_scores: list[dict[tuple[str, int], MapScores]] = [{} for _ in results]
        try:
            inputs = followups.staged_inputs(results) if plan.scores else []
            if plan.budget.gradient_rows:
                results = await self._gradient_rows(
                    runtime, meta, plan, results, deadline, reservation
                )
            if _gradient_free(plan):
                fraction = await _tail_fraction(runtime, plan)
                input_hw = (meta.recipe.crop, meta.recipe.crop)
                channels = await runtime.on_worker(
                    followups.channel_plan, results, plan, chunk, fraction, input_hw
                )
                await followups.submit_in_waves(
                    runtime, channels.jobs(), deadline, reservation, chunk
                )
                results = await runtime.on_worker(channels.finish)
            if not plan.scores:
                return [dataclasses.replace(r, retained=()) for r in results], no_scores
            scored, keys = await runtime.on_worker(
                followups.score_plan, inputs, results, plan, chunk
            )
            await followups.submit_in_waves(runtime, scored.jobs(), deadline, reservation, chunk)
            scores = await runtime.on_worker(followups.scores_by_image, scored, keys, len(results))
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a domain error
            raise service_error(exc, runtime.spec.name) from None
        return [dataclasses.replace(r, retained=()) for r in results], scores

    @staticmethod
    async def _gradient_rows(
        runtime: ModelRuntime,
        meta: ModelMeta,
        plan: ExplainPlan,
        results: list[RowResult],
        deadline: float | None,
        reservation: Reservation,
    ) -> list[RowResult]:
        """SmoothGrad's and IG's rows, in jobs of at most the model's `max_gradient_rows`."""
        recipe = meta.recipe
        chunk = runtime.spec.max_gradient_rows
        rows = await runtime.on_worker(
            followups.gradient_plan, results, plan, chunk, recipe.mean, recipe.std
        )
        jobs = rows.jobs()
        await followups.submit_in_waves(runtime, jobs, deadline, reservation, meta.max_batch_size)
        return await runtime.on_worker(rows.finish)

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
        if meta.device.startswith("cuda") and not keep:
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

    @staticmethod
    def _jobs(prepared: list[PreparedImage], plan: ExplainPlan) -> list[ImageJob]:
        inspection = row_inspection(plan.inspect)
        return [
            ImageJob(
                pixels=item.pixels,
                row=RowRequest(
                    layer=plan.layer,
                    methods=pass_methods(plan.methods),
                    classes=target.classes,
                    top_k=target.top_k,
                    eigen_smooth=plan.eigen_smooth,
                    aug_smooth=plan.aug_smooth,
                    # Rows after the pass need the activations; scores and gradient rows, the
                    # staged input.
                    keep_activations=_keeps_input(plan),
                    outputs=(ATTRIBUTIONS,) if plan.output.raw and plan.budget.pixel_maps else (),
                    reduction=plan.pixel.reduction,
                    inspection=inspection,
                ),
            )
            for item, target in zip(prepared, plan.targets, strict=True)
        ]

    @staticmethod
    async def _compute(
        runtime: ModelRuntime,
        jobs: list[ImageJob],
        deadline: float | None,
        reservation: Reservation,
    ) -> list[Computed]:
        try:
            return await runtime.submit(jobs, deadline, reservation)
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a domain error
            raise service_error(exc, runtime.spec.name) from None

    def _runtime(self, name: str) -> ModelRuntime:
        try:
            return self._registry.get(name)
        except UnknownModel as exc:
            raise ModelNotFound(exc.args[0]) from None

    @staticmethod
    def _status(runtime: ModelRuntime) -> ModelStatus:
        spec = runtime.spec
        return ModelStatus(
            name=spec.name,
            version=spec.version,
            max_batch_size=spec.max_batch_size,
            meta=runtime.meta if runtime.ready else None,
            serving=runtime.healthy,
        )
