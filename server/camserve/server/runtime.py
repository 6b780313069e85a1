"""One hosted model at run time: its engine, its batcher and the worker thread that computes.

The engine runs on a single worker thread per model so that the event loop never blocks on torch,
and batches of one model never race each other. A batch that fails is split in halves and retried,
so a failure (a CUDA out-of-memory, or an item the engine refuses) reaches only the items it
concerns, and the others still get their results. The retry starts only after the failed
attempt's tensors and traceback are released, so the halves never run beside the failed batch.

Health (`camserve.server.health`): a model whose batches keep failing with a fault turns
failing: `on_health(False)` is called, batches are no longer bisected (a model-wide fault would
cost 2N-1 passes each), and the model is probed every `health_probe_s` with one image; the
first batch or probe that succeeds calls `on_health(True)`. A row whose logits or maps are not
finite fails alone, as a fault (`camserve.server.faults`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from camserve.server.batcher import BatchInfo, DynamicBatcher, Reservation
from camserve.server.engine import (
    BY_NAME,
    CamEngine,
    ModelFault,
    RowRequest,
    RowResult,
)
from camserve.server.engine.gates import find_gates
from camserve.server.engine.gradient_rows import GradientJob, run_gradient_jobs
from camserve.server.engine.jobs import ForwardJob, run_forward
from camserve.server.engine.kernels import conv_layers, conv_weights
from camserve.server.engine.registry import (
    GUIDED_METHODS,
    PASS_METHODS,
    UNGUIDED_PIXEL_METHODS,
)
from camserve.server.faults import checked_rows
from camserve.server.health import HealthTracker
from camserve.server.metrics import Metrics
from camserve.server.models.labels import load_labels
from camserve.server.models.loading import (
    ModelLoadError,
    build_model,
    input_recipe,
    layout_hints,
)
from camserve.server.records import InputRecipe, MethodInfo, ModelMeta
from camserve.server.settings import ModelSettings
from camserve.server.staging import InputStager
from camserve.server.work import ImageJob, WorkItem, item_cost, passes

log = logging.getLogger("camserve.runtime")
T = TypeVar("T")
# Per item: its engine result (None for a forward job, which records its own) and the seconds
# its batch took, or its failure.
Outcome = tuple[RowResult | None, float] | BaseException


@dataclass(frozen=True)
class Computed:
    """One image's engine result with the time its batch took to compute."""

    result: RowResult
    compute_s: float
    batch: BatchInfo


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    return device


class ModelRuntime:
    """Loads one model, then explains batches of `ImageJob`s for it."""

    def __init__(
        self,
        spec: ModelSettings,
        metrics: Metrics,
        on_health: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.spec = spec
        self._metrics = metrics
        self._on_health = on_health
        self._engine: CamEngine | None = None
        self._stager: InputStager | None = None
        self._meta: ModelMeta | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{spec.name}")
        self._batcher: DynamicBatcher[WorkItem, tuple[RowResult | None, float]] | None = None
        self._tail_fractions: dict[str, float] = {}
        self._health = HealthTracker(spec.failing_after)
        self._probing: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """False while the model is failing (see `camserve.server.health`)."""
        return self._health.serving

    @property
    def ready(self) -> bool:
        return self._meta is not None and self._batcher is not None

    @property
    def meta(self) -> ModelMeta:
        if self._meta is None:
            raise RuntimeError(f"model {self.spec.name!r} is not loaded yet")
        return self._meta

    @property
    def queue_depth(self) -> int:
        return 0 if self._batcher is None else self._batcher.depth

    def load(self, warmup: bool) -> None:
        """Builds the model and engine, reads its layers, warms it up (blocking; call off-loop)."""
        spec = self.spec
        started = time.monotonic()
        device = _resolve_device(spec.device)
        if spec.precision == "float16" and device.type != "cuda":
            raise ModelLoadError(
                f"model {spec.name!r}: precision float16 needs CUDA; use bfloat16 or float32 on "
                "the CPU"
            )
        model = build_model(spec)
        recipe = input_recipe(spec, model)
        engine = CamEngine(
            model, device=device, precision=spec.precision, layouts=layout_hints(spec)
        )
        meta = _read_meta(spec, engine, str(device), recipe)
        if warmup:
            batch = spec.max_batch_size if device.type == "cuda" else 1
            rows = [RowRequest(layer=meta.default_layer, methods=PASS_METHODS)] * batch
            size = meta.recipe.crop
            engine.explain_batch(torch.zeros(batch, 3, size, size), rows)
        self._stager = InputStager(device, recipe.mean, recipe.std)
        self._engine, self._meta = engine, meta
        log.info(
            "model loaded",
            extra={
                "model": spec.name,
                "device": str(device),
                "layer": meta.default_layer,
                "seconds": round(time.monotonic() - started, 2),
            },
        )

    def start(self) -> None:
        """Starts batching on the running event loop (after `load`)."""
        name = self.spec.name
        self._batcher = DynamicBatcher(
            self._process,
            max_batch_size=self.spec.max_batch_size,
            max_delay_s=self.spec.max_delay_ms / 1000.0,
            max_queue=self.spec.max_queue,
            on_batch=lambda size, depth: self._metrics.observe_batch(name, size, depth),
            on_expired=lambda count: self._metrics.expired.labels(name).inc(count),
            cost=item_cost,
            adaptive=self.spec.adaptive_delay,
        )
        self._batcher.start()

    def reserve(self, cost: int) -> Reservation:
        """Holds queue room for a request's whole cost (its images and every forward-only row
        after them, in forward passes) before anything is decoded; QueueFull if there is none."""
        return self._started().reserve(cost)

    async def conv_weights(self, layer: str, pool: Executor) -> np.ndarray:
        """The float32 weights of the Conv2d `layer`, read on `pool` (reading a parameter is
        safe beside a running batch, so it never waits for the engine's worker)."""
        if self._engine is None:
            raise RuntimeError(f"model {self.spec.name!r} is not loaded yet")
        model = self._engine.model
        return await asyncio.get_running_loop().run_in_executor(pool, conv_weights, model, layer)

    async def tail_fraction(self, layer: str) -> float:
        """The share of a forward pass that runs after `layer` (what an AblationCAM row costs);
        the first call per layer measures it on the worker thread, later ones remember it."""
        if layer not in self._tail_fractions:
            assert self._engine is not None
            size = (self.meta.recipe.crop, self.meta.recipe.crop)
            loop = asyncio.get_running_loop()
            self._tail_fractions[layer] = await loop.run_in_executor(
                self._executor, self._engine.tail_fraction, layer, size
            )
        return self._tail_fractions[layer]

    async def on_worker(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` run on the model's engine worker thread, between its batches: follow-up
        plans are built and finished there, so the device tensors they hold stay on it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def submit(
        self, jobs: list[ImageJob], deadline: float | None, reservation: Reservation | None = None
    ) -> list[Computed]:
        """Queues the jobs of one request together and waits for their results."""
        outcomes = await self._started().submit(jobs, deadline, reservation)
        computed = []
        for (result, seconds), info in outcomes:
            assert result is not None, "image jobs always have a result"
            computed.append(Computed(result, seconds, info))
        return computed

    async def run(
        self,
        jobs: list[ForwardJob | GradientJob],
        deadline: float | None,
        reservation: Reservation | None,
    ) -> float:
        """Queues forward-only jobs together and waits until each has recorded its logits;
        returns the compute seconds of the slowest batch they ran in."""
        outcomes = await self._started().submit(jobs, deadline, reservation)
        return max((seconds for (_, seconds), _ in outcomes), default=0.0)

    async def close(self) -> None:
        """Stops probing, finishes every queued item, then stops the worker thread."""
        if self._probing is not None:
            self._probing.cancel()
        if self._batcher is not None:
            await self._batcher.close()
        self._executor.shutdown(wait=True)

    def _started(self) -> DynamicBatcher[WorkItem, tuple[RowResult | None, float]]:
        if self._batcher is None:
            raise RuntimeError(f"model {self.spec.name!r} is not started")
        return self._batcher

    async def _process(self, jobs: list[WorkItem]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._executor, self._compute, jobs)
        self._track_health(outcomes)
        return outcomes

    def _track_health(self, outcomes: list[Outcome]) -> None:
        """Feeds a batch's outcomes to the health policy; reports failing and recovered models
        and probes a failing one."""
        if not self._health.observe(outcomes):
            return
        healthy = self._health.serving
        name = self.spec.name
        faults = [o for o in outcomes if isinstance(o, BaseException)]
        log.warning(
            "model health changed",
            extra={"model": name, "serving": healthy, "error": repr(faults[:1])},
        )
        self._metrics.model_ready.labels(name).set(1 if healthy else 0)
        if self._on_health is not None:
            self._on_health(name, healthy)
        if not healthy and self.spec.health_probe_s > 0 and self._probing is None:
            self._probing = asyncio.get_running_loop().create_task(self._probe_while_failing())

    async def _probe_while_failing(self) -> None:
        """Runs one probe image every `health_probe_s` until the model serves again."""
        loop = asyncio.get_running_loop()
        try:
            while not self.healthy:
                await asyncio.sleep(self.spec.health_probe_s)
                if self.healthy:  # a request's batch succeeded meanwhile
                    break
                outcome = await loop.run_in_executor(self._executor, self._probe)
                self._track_health([outcome])
        finally:
            self._probing = None

    def _probe(self) -> Outcome:
        """One blank image explained at the default layer, checked like a request's."""
        crop = self.meta.recipe.crop
        job = ImageJob(
            pixels=torch.zeros(3, crop, crop, dtype=torch.uint8),
            row=RowRequest(layer=self.meta.default_layer),
        )
        try:
            (result,) = self._explain([job])
        except Exception as exc:  # noqa: BLE001 - the probe's outcome, judged by the policy
            return _detached(exc)
        return result if isinstance(result, BaseException) else (result, 0.0)

    def _compute(self, jobs: list[WorkItem]) -> list[Outcome]:
        """Explains a batch; on failure bisects it so only the failing items fail."""
        outcome = self._attempt(jobs)
        if not isinstance(outcome, BaseException):
            return outcome
        # Out of the except block: the failed attempt's frames and tensors are gone by now.
        if isinstance(outcome, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(jobs) == 1 or not self.healthy:
            log.warning("items failed", extra={"model": self.spec.name, "error": repr(outcome)})
            return [outcome] * len(jobs)
        half = len(jobs) // 2
        return self._compute(jobs[:half]) + self._compute(jobs[half:])

    def _attempt(self, jobs: list[WorkItem]) -> list[Outcome] | BaseException:
        """One engine pass over `jobs`: their outcomes, or the exception (traceback dropped)."""
        assert self._engine is not None
        started = time.monotonic()
        images = [job for job in jobs if isinstance(job, ImageJob)]
        forward = [job for job in jobs if isinstance(job, ForwardJob)]
        gradients = [job for job in jobs if isinstance(job, GradientJob)]
        try:
            with self._metrics.cpu_time(self.spec.name, "compute"):
                explained = iter(self._explain(images))
                faulted: dict[ForwardJob | GradientJob, ModelFault] = {}
                for ran in (
                    run_forward(self._engine, forward),
                    run_gradient_jobs(self._engine, gradients, self.spec.max_gradient_rows),
                ):
                    faulted.update(ran.items())
        except Exception as exc:  # noqa: BLE001 - isolated by the caller, reported per item
            return _detached(exc)
        seconds = time.monotonic() - started
        self._metrics.images.labels(self.spec.name).inc(len(images))
        self._metrics.batch_seconds.labels(self.spec.name).observe(seconds)
        log.info(
            "batch explained",
            extra={"model": self.spec.name, "batch": len(jobs), "ms": round(seconds * 1000, 1)},
        )
        outcomes: list[Outcome] = []
        for job in jobs:
            result = next(explained) if isinstance(job, ImageJob) else faulted.get(job)
            outcomes.append(result if isinstance(result, BaseException) else (result, seconds))
        return outcomes

    def _explain(self, jobs: list[ImageJob]) -> list[RowResult | ModelFault]:
        """Each job's result, or the fault of a row whose outputs are not finite. Rows taking
        their gradient at the input run apart, in passes of at most `max_gradient_rows`."""
        found: dict[int, RowResult | ModelFault] = {}
        for part in passes(jobs, self.spec.max_gradient_rows):
            for index, result in zip(
                part, self._explain_pass([jobs[i] for i in part]), strict=True
            ):
                found[index] = result
        return [found[i] for i in range(len(jobs))]

    def _explain_pass(self, jobs: list[ImageJob]) -> list[RowResult | ModelFault]:
        if not jobs:
            return []
        assert self._engine is not None
        assert self._stager is not None
        batch = self._stager.batch([job.pixels for job in jobs])
        results = self._engine.explain_batch(batch, [job.row for job in jobs])
        return checked_rows(results)


def _detached(exc: BaseException) -> BaseException:
    """The exception without tracebacks (along its chain), so it pins no frame's tensors."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


def _gradient_path(method: str) -> str:
    """ "noise" or "path" for a method made by gradient rows after the pass, else ""."""
    pixel = BY_NAME[method].pixel
    return pixel.path if pixel is not None else ""


def _read_meta(
    spec: ModelSettings, engine: CamEngine, device: str, recipe: InputRecipe
) -> ModelMeta:
    """What the model tells about itself at its input size: layers, classes, labels."""
    size = (recipe.crop, recipe.crop)
    layers = tuple(engine.layers(size))
    default_layer = spec.default_layer or engine.default_layer(size)
    if default_layer not in {layer.name for layer in layers}:
        raise ModelLoadError(
            f"model {spec.name!r}: default_layer {default_layer!r} is not a valid target; "
            f"valid: {', '.join(layer.name for layer in layers[-8:])}, ..."
        )
    num_classes = int(engine.predict(torch.zeros(1, 3, *size)).shape[1])
    try:
        labels = load_labels(spec.labels, num_classes)
    except ValueError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc}") from None
    costs = engine.method_costs(default_layer, size)
    nonlinearities = engine.nonlinearities(size)
    refused = {m: nonlinearities.refusal(m, UNGUIDED_PIXEL_METHODS) for m in GUIDED_METHODS}
    return ModelMeta(
        name=spec.name,
        version=spec.version,
        device=device,
        num_classes=num_classes,
        labels=labels,
        default_layer=default_layer,
        layers=layers,
        recipe=recipe,
        methods=tuple(
            MethodInfo(
                method,
                cost.rows,
                cost.forward_passes,
                BY_NAME[method].layouts,
                channel_rows=BY_NAME[method].rows is not None,
                through_tail=BY_NAME[method].runs_tail,
                pixel=BY_NAME[method].pixel is not None,
                input_gradient=bool(BY_NAME[method].input_gradient),
                gradient_rows=_gradient_path(method),
            )
            for method, cost in costs.items()
            if refused.get(method) is None
        ),
        refused={m: reason for m, reason in refused.items() if reason is not None},
        max_batch_size=spec.max_batch_size,
        conv_layers=conv_layers(engine.model),
        gates=find_gates(engine.model, size),
        channels_last_input=engine.device.type == "cpu" and engine.channels_last,
    )
