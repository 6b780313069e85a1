"""The model side of a request in this process: admission, batching, the engine pass and the
follow-up rows, over the models of a `ModelRegistry`.

The one-process server uses it directly; in the multi-process layout the engine process runs it
for every frontend (`camserve.server.engine_process`), so both layouts share one code path from
admission to the last score.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor

import numpy as np
import torch

from camserve.server import followups
from camserve.server.backend import ComputedRequest, HealthListener
from camserve.server.batcher import Reservation
from camserve.server.engine import MapScores, RowRequest, RowResult
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.registry import pass_methods
from camserve.server.engine.types import ATTRIBUTIONS
from camserve.server.errors import ModelNotFound
from camserve.server.faults import service_error
from camserve.server.followups import explain_row_cost
from camserve.server.inspect_outputs import row_inspection
from camserve.server.metrics import Metrics
from camserve.server.records import ModelMeta, ModelStatus
from camserve.server.registry import ModelRegistry, UnknownModel
from camserve.server.runtime import ModelRuntime
from camserve.server.settings import Settings
from camserve.server.validation import ExplainPlan
from camserve.server.work import ImageJob

Scores = list[dict[tuple[str, int], MapScores]]


def _gradient_free(plan: ExplainPlan) -> bool:
    return plan.budget.rows_after_pass


def keeps_input(plan: ExplainPlan) -> bool:
    """Whether rows after the pass need the explain row's activations or staged input."""
    return _gradient_free(plan) or bool(plan.scores) or bool(plan.budget.gradient_rows)


async def _tail_fraction(runtime: ModelRuntime, plan: ExplainPlan) -> float:
    """What a row after the layer costs; only methods running the tail measure one."""
    if not plan.budget.tail_methods:
        return 1.0
    return await runtime.tail_fraction(plan.layer)


def image_jobs(pixels: Sequence[torch.Tensor], plan: ExplainPlan) -> list[ImageJob]:
    """One explain job per image of the request, each with its own targets."""
    inspection = row_inspection(plan.inspect)
    return [
        ImageJob(
            pixels=item,
            row=RowRequest(
                layer=plan.layer,
                methods=pass_methods(plan.methods),
                classes=target.classes,
                top_k=target.top_k,
                eigen_smooth=plan.eigen_smooth,
                aug_smooth=plan.aug_smooth,
                # Rows after the pass need the activations; scores and gradient rows, the
                # staged input.
                keep_activations=keeps_input(plan),
                outputs=(ATTRIBUTIONS,) if plan.output.raw and plan.budget.pixel_maps else (),
                reduction=plan.pixel.reduction,
                inspection=inspection,
            ),
        )
        for item, target in zip(pixels, plan.targets, strict=True)
    ]


async def request_cost(runtime: ModelRuntime, meta: ModelMeta, plan: ExplainPlan) -> int:
    """The request's cost in forward passes: its images, plus the rows of gradient-free
    methods and scores when it asks for them."""
    if not keeps_input(plan):
        return len(plan.targets) * explain_rows(plan.aug_smooth) * explain_row_cost(plan)
    try:
        fraction = await _tail_fraction(runtime, plan)
    except Exception as exc:  # noqa: BLE001 - e.g. a layer the tail cannot be measured at
        raise service_error(exc, meta.name) from None
    return followups.request_cost(plan, tail_fraction=fraction, chunk=meta.max_batch_size)


def _without_retained(results: list[RowResult]) -> list[RowResult]:
    """The results without the tensors kept for follow-up rows, which never leave the engine."""
    return [dataclasses.replace(r, retained=()) if r.retained else r for r in results]


class LocalAdmission:
    """A request admitted to one model of this process; `compute` runs it to its results."""

    def __init__(
        self, runtime: ModelRuntime, meta: ModelMeta, plan: ExplainPlan, reservation: Reservation
    ) -> None:
        self._runtime = runtime
        self._meta = meta
        self._plan = plan
        self._reservation = reservation

    async def compute(
        self, pixels: Sequence[torch.Tensor], deadline: float | None
    ) -> ComputedRequest:
        runtime, name = self._runtime, self._runtime.spec.name
        try:
            computed = await runtime.submit(
                image_jobs(pixels, self._plan), deadline, self._reservation
            )
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a domain error
            raise service_error(exc, name) from None
        started = time.monotonic()
        results, scores = await self._follow_up([c.result for c in computed], deadline)
        return ComputedRequest(
            results=results,
            scores=scores,
            queue_s=max(c.batch.queue_s for c in computed),
            compute_s=max(c.compute_s for c in computed) + time.monotonic() - started,
            batch_size=max(c.batch.size for c in computed),
        )

    async def _follow_up(
        self, results: list[RowResult], deadline: float | None
    ) -> tuple[list[RowResult], Scores]:
        """Runs the request's forward-only work: the maps of methods made by rows after the
        pass, then the scores of all its maps. Plans are built and finished on the model's
        worker thread, where the tensors the explain pass left on the device live."""
        runtime, meta, plan, reservation = self._runtime, self._meta, self._plan, self._reservation
        chunk = meta.max_batch_size
        no_scores: Scores = [{} for _ in results]
        try:
            inputs = followups.staged_inputs(results) if plan.scores else []
            if plan.budget.gradient_rows:
                results = await self._gradient_rows(results, deadline)
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
                return _without_retained(results), no_scores
            scored, keys = await runtime.on_worker(
                followups.score_plan, inputs, results, plan, chunk
            )
            await followups.submit_in_waves(runtime, scored.jobs(), deadline, reservation, chunk)
            scores = await runtime.on_worker(followups.scores_by_image, scored, keys, len(results))
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a domain error
            raise service_error(exc, runtime.spec.name) from None
        return _without_retained(results), scores

    async def _gradient_rows(
        self, results: list[RowResult], deadline: float | None
    ) -> list[RowResult]:
        """SmoothGrad's and IG's rows, in jobs of at most the model's `max_gradient_rows`."""
        runtime, recipe = self._runtime, self._meta.recipe
        rows = await runtime.on_worker(
            followups.gradient_plan,
            results,
            self._plan,
            runtime.spec.max_gradient_rows,
            recipe.mean,
            recipe.std,
        )
        await followups.submit_in_waves(
            runtime, rows.jobs(), deadline, self._reservation, self._meta.max_batch_size
        )
        return await runtime.on_worker(rows.finish)


class LocalBackend:
    """The models of this process (`camserve.server.backend.ModelBackend`)."""

    def __init__(self, settings: Settings, metrics: Metrics, pool: Executor) -> None:
        self._listener: HealthListener | None = None
        self.registry = ModelRegistry(settings, metrics, on_health=self._relay_health)
        self._pool = pool
        self._metrics = metrics

    def _relay_health(self, model: str, serving: bool) -> None:
        if self._listener is not None:
            self._listener(model, serving)

    def runtime(self, name: str) -> ModelRuntime:
        try:
            return self.registry.get(name)
        except UnknownModel as exc:
            raise ModelNotFound(exc.args[0]) from None

    def statuses(self) -> list[ModelStatus]:
        return [_status(runtime) for runtime in self.registry]

    def status(self, name: str) -> ModelStatus:
        return _status(self.runtime(name))

    @contextlib.asynccontextmanager
    async def admit(self, meta: ModelMeta, plan: ExplainPlan) -> AsyncIterator[LocalAdmission]:
        runtime = self.runtime(meta.name)
        cost = await request_cost(runtime, meta, plan)
        try:  # admission first: a refused request costs no decoding
            reservation = runtime.reserve(cost)
        except Exception as exc:  # noqa: BLE001 - translated into the domain error
            raise service_error(exc, meta.name) from None
        with reservation:
            yield LocalAdmission(runtime, meta, plan, reservation)

    async def conv_weights(self, model: str, layer: str) -> np.ndarray:
        return await self.runtime(model).conv_weights(layer, self._pool)

    async def start(self, on_health: HealthListener) -> None:
        self._listener = on_health
        await asyncio.get_running_loop().run_in_executor(None, self.registry.load_all)
        self.registry.start_all()
        if any(runtime.meta.device.startswith("cuda") for runtime in self.registry):
            self._metrics.watch_cuda_memory()

    async def close(self) -> None:
        await self.registry.close_all()


def _status(runtime: ModelRuntime) -> ModelStatus:
    spec = runtime.spec
    return ModelStatus(
        name=spec.name,
        version=spec.version,
        max_batch_size=spec.max_batch_size,
        meta=runtime.meta if runtime.ready else None,
        serving=runtime.healthy,
    )
