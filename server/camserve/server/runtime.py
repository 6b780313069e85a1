"""One hosted model at run time: its engine, its batcher and the worker thread that computes.

The engine runs on a single worker thread per model so that the event loop never blocks on torch,
and batches of one model never race each other. A batch that fails is split in halves and retried,
so a failure (a CUDA out-of-memory, or an item the engine refuses) reaches only the items it
concerns, and the others still get their results.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from camserve.server.batcher import BatchInfo, DynamicBatcher
from camserve.server.engine import METHODS, CamEngine, LayerSpec, RowRequest, RowResult
from camserve.server.metrics import Metrics
from camserve.server.models.labels import load_labels
from camserve.server.models.loading import (
    ModelLoadError,
    build_model,
    input_recipe,
    layout_hints,
)
from camserve.server.preprocess import InputRecipe
from camserve.server.settings import ModelSettings

log = logging.getLogger("camserve.runtime")


@dataclass(frozen=True)
class ImageJob:
    """One image's work: its model input and what to explain in it."""

    tensor: torch.Tensor  # (3, H, W) float32
    row: RowRequest


@dataclass(frozen=True)
class Computed:
    """One image's engine result with the time its batch took to compute."""

    result: RowResult
    compute_s: float
    batch: BatchInfo


@dataclass(frozen=True)
class ModelMeta:
    """What clients and the request validator need to know about a loaded model."""

    name: str
    version: str
    device: str
    num_classes: int
    labels: tuple[str, ...]
    default_layer: str
    layers: tuple[LayerSpec, ...]
    recipe: InputRecipe
    max_batch_size: int

    @functools.cached_property
    def layer_names(self) -> frozenset[str]:
        return frozenset(layer.name for layer in self.layers)

    @functools.cached_property
    def label_index(self) -> dict[str, int]:
        """Label to class index, built once per model rather than per request."""
        return {label: i for i, label in enumerate(self.labels)}


def _resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    return device


class ModelRuntime:
    """Loads one model, then explains batches of `ImageJob`s for it."""

    def __init__(self, spec: ModelSettings, metrics: Metrics) -> None:
        self.spec = spec
        self._metrics = metrics
        self._engine: CamEngine | None = None
        self._meta: ModelMeta | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{spec.name}")
        self._batcher: DynamicBatcher[ImageJob, tuple[RowResult, float]] | None = None

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
        if spec.precision != "float32" and device.type != "cuda":
            raise ModelLoadError(f"model {spec.name!r}: precision {spec.precision} needs CUDA")
        model = build_model(spec)
        recipe = input_recipe(spec, model)
        engine = CamEngine(
            model, device=device, precision=spec.precision, layouts=layout_hints(spec)
        )
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
        if warmup:
            batch = spec.max_batch_size if device.type == "cuda" else 1
            rows = [RowRequest(layer=default_layer, methods=METHODS)] * batch
            engine.explain(torch.zeros(batch, 3, *size), rows)
        self._engine = engine
        self._meta = ModelMeta(
            name=spec.name,
            version=spec.version,
            device=str(device),
            num_classes=num_classes,
            labels=labels,
            default_layer=default_layer,
            layers=layers,
            recipe=recipe,
            max_batch_size=spec.max_batch_size,
        )
        log.info(
            "model loaded",
            extra={
                "model": spec.name,
                "device": str(device),
                "layer": default_layer,
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
        )
        self._batcher.start()

    async def explain(self, jobs: list[ImageJob], deadline: float | None) -> list[Computed]:
        """Queues the jobs of one request together and waits for their results."""
        if self._batcher is None:
            raise RuntimeError(f"model {self.spec.name!r} is not started")
        outcomes = await self._batcher.submit(jobs, deadline)
        self._metrics.queue_depth.labels(self.spec.name).set(self._batcher.depth)
        return [Computed(result, seconds, info) for (result, seconds), info in outcomes]

    async def close(self) -> None:
        """Finishes every queued item, then stops the worker thread."""
        if self._batcher is not None:
            await self._batcher.close()
        self._executor.shutdown(wait=True)

    async def _process(self, jobs: list[ImageJob]) -> list[tuple[RowResult, float] | BaseException]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._compute, jobs)

    def _compute(self, jobs: list[ImageJob]) -> list[tuple[RowResult, float] | BaseException]:
        """Explains a batch; on failure bisects it so only the failing items fail."""
        assert self._engine is not None
        started = time.monotonic()
        try:
            batch = torch.stack([job.tensor for job in jobs])
            results = self._engine.explain(batch, [job.row for job in jobs])
        except Exception as exc:  # noqa: BLE001 - isolated below, reported per item
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                log.warning("item failed", extra={"model": self.spec.name, "error": repr(exc)})
                return [exc]
            half = len(jobs) // 2
            return self._compute(jobs[:half]) + self._compute(jobs[half:])
        seconds = time.monotonic() - started
        self._metrics.images.labels(self.spec.name).inc(len(jobs))
        self._metrics.latency.labels("compute").observe(seconds)
        log.info(
            "batch explained",
            extra={"model": self.spec.name, "batch": len(jobs), "ms": round(seconds * 1000, 1)},
        )
        return [(result, seconds) for result in results]
