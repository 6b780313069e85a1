"""SmoothGrad and Integrated Gradients as rows after the explain pass, in jobs a batcher runs.

Both need many rows per image, each with its gradient at the input: SmoothGrad n noisy copies,
IG n points on the path from a baseline (plus the baseline itself, for the convergence delta).
They are a follow-up plan like the gradient-free methods' (`jobs.FollowUpPlan`: cost, jobs,
finish) rather than rows of the main pass, because n can be hundreds per image: as jobs they
are admitted at their cost, run in waves between other requests' batches under the request's
deadline, and are cut to the model's rows-per-pass bound for input gradients, which one pass
over a whole batch's copies would not respect.

1. `CamEngine.explain_batch` with `keep_activations=True`: the classes (top-k picked there), the
   logits and the staged model input (`RowResult.retained`).
2. `GradientPlan(results, methods, params)`: per image and method, its rows in `GradientJob`s of
   at most `chunk` rows. A job's rows are explain-pass rows asking for the plain gradient at
   the input of the row's classes (`saliency` with `ATTRIBUTIONS`), so they are batched, padded
   and vmapped like any other.
3. The jobs run (`run_gradient_jobs`, from the server's batcher or `run_gradient_plan`), each
   adding its gradients into the plan's sums (copy order does not matter for a sum; each
   copy's noise depends only on the seed and its index).
4. `GradientPlan.finish`: the maps (method, class) reduced over channels, the unreduced
   attributions when asked, IG's convergence delta under `delta_kind(method)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from camserve.server.engine import saliency
from camserve.server.engine.jobs import chunk_sizes
from camserve.server.engine.registry import (
    GRADIENT_ROW_COST,
    PLAIN_GRADIENT,
    Method,
    needing_gradient_rows,
)
from camserve.server.engine.types import (
    ATTRIBUTIONS,
    EngineError,
    ModelFault,
    RowRequest,
    RowResult,
    attribution_kind,
)

if TYPE_CHECKING:
    from camserve.server.engine.core import CamEngine

DEFAULT_CHUNK_ROWS = 16


def delta_kind(method: str) -> str:
    """The `RowResult.outputs` key of IG's convergence deltas (one per class)."""
    return f"convergence_delta.{method}"


@dataclass(frozen=True)
class SaliencyParams:
    """The options of the pixel methods (see `camserve.server.engine.saliency`); `mean` and
    `std` make the black baseline."""

    samples: int = saliency.DEFAULT_SAMPLES
    noise: float = saliency.DEFAULT_NOISE
    seed: int = 0
    steps: int = saliency.DEFAULT_STEPS
    quadrature: str = "gausslegendre"
    baseline: str = "zero"
    reduction: str = ""
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def rows(self, method: Method) -> int:
        """Rows `method` needs per image: SmoothGrad's copies, IG's points and its baseline."""
        if not method.gradient_rows or method.pixel is None:
            return 0
        return self.samples if method.pixel.path == "noise" else self.steps + 1


@dataclass(eq=False)
class GradientJob:
    """Rows with their gradient at the input, run in one pass with the jobs sharing its key."""

    key: Hashable
    rows: int
    cost: int  # in forward passes: GRADIENT_ROW_COST per row
    build: Callable[[], tuple[torch.Tensor, list[RowRequest]]]
    record: Callable[[list[RowResult]], None]


@dataclass(eq=False)
class _Attribution:
    """One image's SmoothGrad or IG: its rows and the sums they add into."""

    method: Method
    result: RowResult
    image: torch.Tensor  # (3, H, W) staged model input, on the engine's device
    params: SaliencyParams
    asked_raw: bool
    total: torch.Tensor | None = field(default=None, repr=False)  # (K, 3, H, W) on the host
    baseline_scores: torch.Tensor | None = None  # IG: (K,) logits of the baseline row
    sigma: float = 0.0  # SmoothGrad's noise
    sizes: list[float] = field(default_factory=list)  # IG's step sizes and alphas
    alphas: list[float] = field(default_factory=list)
    baseline: torch.Tensor = field(init=False, repr=False)  # IG's (3, H, W), on the device
    path: str = field(init=False)

    def __post_init__(self) -> None:
        assert self.method.pixel is not None, "gradient-row methods are pixel methods"
        self.path = self.method.pixel.path
        if self.path == "noise":
            self.sigma = saliency.noise_sigma(self.image, self.params.noise)
            return
        self.sizes, self.alphas = saliency.quadrature(self.params.quadrature, self.params.steps)
        self.baseline = saliency.baseline_for(
            self.params.baseline, self.image, self.params.mean, self.params.std
        )

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, list[RowRequest]]:
        """Rows [start, stop): noisy copies, or path points then (last) the baseline."""
        if self.path == "noise":
            images = saliency.noisy_copies(self.image, self.sigma, self.params.seed, start, stop)
        else:
            points = saliency.path_points(
                self.image, self.baseline, self.alphas, start, min(stop, self.params.steps)
            )
            if stop > self.params.steps:
                points = torch.cat([points, self.baseline[None]])
            images = points
        row = RowRequest(
            layer=self.result.layer,
            methods=(PLAIN_GRADIENT,),
            classes=self.result.classes,
            outputs=(ATTRIBUTIONS,),
        )
        return images, [row] * (stop - start)

    def record(self, start: int, results: list[RowResult]) -> None:
        """Adds rows' gradients (weighted by step size for IG) into the sum."""
        for offset, result in enumerate(results):
            index = start + offset
            if self.path == "path" and index == self.params.steps:
                self.baseline_scores = result.logits[list(self.result.classes)]
                continue
            gradient = result.outputs[attribution_kind(PLAIN_GRADIENT)]
            weight = self.sizes[index] if self.path == "path" else 1.0
            add = gradient * weight if weight != 1.0 else gradient
            self.total = add.clone() if self.total is None else self.total.add_(add)

    def outcome(self, reduction: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The maps (K, H, W) and the outputs (attributions, IG's deltas) of this image."""
        if self.total is None:
            raise EngineError(f"{self.method.name}: its rows have not run yet; run its jobs")
        if self.path == "noise":
            attributions = self.total / self.params.samples
        else:
            image = self.image.detach().float().cpu()
            attributions = saliency.integrated(image, self.baseline.cpu(), self.total)
        outputs: dict[str, torch.Tensor] = {}
        if self.asked_raw:
            outputs[attribution_kind(self.method.name)] = attributions
        if self.path == "path":
            assert self.baseline_scores is not None, "the baseline row runs with the path"
            scores = self.result.logits[list(self.result.classes)]
            deltas = saliency.convergence_delta(attributions, scores, self.baseline_scores)
            outputs[delta_kind(self.method.name)] = deltas.float()
        assert self.method.pixel is not None
        maps = saliency.reduce_channels(attributions, reduction or self.method.pixel.reduction)
        return maps, outputs


class GradientPlan:
    """The gradient-row methods of a batch's results, as one `FollowUpPlan`: see the module
    docstring. `methods[i]` are result i's methods (the others are ignored)."""

    def __init__(
        self,
        results: Sequence[RowResult],
        methods: Sequence[Sequence[str]],
        params: SaliencyParams,
        *,
        raw: bool = False,
        chunk: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        if chunk < 1:
            raise EngineError(f"chunk must be >= 1, got {chunk}")
        self._results = list(results)
        self._params = params
        self._work: list[tuple[int, _Attribution]] = []
        self._jobs: list[GradientJob] = []
        for i, (result, names) in enumerate(zip(self._results, methods, strict=True)):
            for entry in needing_gradient_rows(tuple(names)):
                if not result.retained:
                    raise EngineError(
                        f"{entry.name} needs the row's staged input: explain it "
                        "with keep_activations=True"
                    )
                image = result.retained[0].image
                work = _Attribution(entry, result, image, params, raw)
                self._work.append((i, work))
                self._jobs += _jobs(work, params.rows(entry), chunk)

    def cost(self) -> int:
        return sum(job.cost for job in self._jobs)

    def jobs(self) -> list[GradientJob]:
        return list(self._jobs)

    def finish(self) -> list[RowResult]:
        """The results with every method's maps and outputs added (`retained` kept: later
        plans of the request may need it)."""
        maps = [dict(result.maps) for result in self._results]
        outputs = [dict(result.outputs) for result in self._results]
        for i, work in self._work:
            found, extra = work.outcome(self._params.reduction)
            for k, class_index in enumerate(self._results[i].classes):
                maps[i][(work.method.name, class_index)] = found[k]
            outputs[i].update(extra)
        return [
            dataclasses.replace(result, maps=maps[i], outputs=outputs[i])
            for i, result in enumerate(self._results)
        ]


def _jobs(work: _Attribution, rows: int, chunk: int) -> list[GradientJob]:
    found = []
    start = 0
    for size in chunk_sizes(rows, chunk):
        found.append(
            GradientJob(
                key=("gradients", tuple(work.image.shape[-2:])),
                rows=size,
                cost=size * GRADIENT_ROW_COST,
                build=functools.partial(work.build, start, start + size),
                record=functools.partial(work.record, start),
            )
        )
        start += size
    return found


def _finite(result: RowResult) -> bool:
    tensors = [result.logits, *result.maps.values(), *result.outputs.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _Packer:
    """Rows of gradient jobs packed into passes of exactly `max_rows` (the last one fewer): a
    job's rows may span two passes, so no pass runs part-empty because jobs do not fit whole.
    A job is handed to `done` with its results as soon as its last row has run, so results
    (each row's attribution) never pile up over a long run of passes."""

    def __init__(
        self,
        engine: CamEngine,
        max_rows: int,
        done: Callable[[GradientJob, list[RowResult]], None],
    ) -> None:
        self._engine = engine
        self._max_rows = max_rows
        self._done = done
        self._images: list[torch.Tensor] = []
        self._rows: list[RowRequest] = []
        self._owners: list[GradientJob] = []
        self._results: dict[GradientJob, list[RowResult]] = {}

    def add(self, job: GradientJob) -> None:
        images, rows = job.build()
        self._results[job] = []
        for start in range(0, len(rows), self._max_rows):
            self._images.append(images[start : start + self._max_rows])
            self._rows += rows[start : start + self._max_rows]
            self._owners += [job] * len(rows[start : start + self._max_rows])
            while len(self._rows) >= self._max_rows:
                self._run(self._max_rows)

    def flush(self) -> None:
        if self._rows:
            self._run(len(self._rows))

    def _run(self, count: int) -> None:
        batch = torch.cat(self._images)
        results = self._engine.explain_batch(batch[:count], self._rows[:count])
        for owner, result in zip(self._owners[:count], results, strict=True):
            self._results[owner].append(result)
            if len(self._results[owner]) == owner.rows:
                self._done(owner, self._results.pop(owner))
        rest = batch[count:]
        self._images = [rest] if rest.shape[0] else []
        self._rows, self._owners = self._rows[count:], self._owners[count:]


def run_gradient_jobs(
    engine: CamEngine, jobs: Sequence[GradientJob], max_rows: int
) -> dict[GradientJob, ModelFault]:
    """Runs gradient jobs, those sharing a key together in passes of `max_rows` rows (`_Packer`),
    and hands each its results; a job with a non-finite result records nothing and is returned
    with its fault instead."""
    faulted: dict[GradientJob, ModelFault] = {}

    def done(job: GradientJob, results: list[RowResult]) -> None:
        if all(map(_finite, results)):
            job.record(results)
        else:
            faulted[job] = ModelFault("its input gradients for this request are not finite")

    groups: dict[Hashable, list[GradientJob]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    for group in groups.values():
        packer = _Packer(engine, max_rows, done)
        for job in group:
            packer.add(job)
        packer.flush()
    return faulted


def run_gradient_plan(engine: CamEngine, plan: GradientPlan, max_rows: int) -> list[RowResult]:
    """Runs a plan to its end synchronously, as the server's batcher runs its jobs."""
    for fault in run_gradient_jobs(engine, plan.jobs(), max_rows).values():
        raise fault
    return plan.finish()


def explain_with_gradient_rows(
    engine: CamEngine,
    batch: torch.Tensor,
    rows: Sequence[RowRequest],
    params: SaliencyParams,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> list[RowResult]:
    """`CamEngine.explain_batch` for rows whose methods may include SmoothGrad and IG, run to
    the end synchronously (for tests, benchmarks and scripts)."""
    asked = [
        dataclasses.replace(
            row,
            methods=tuple(m for m in row.methods if not needing_gradient_rows((m,))),
            keep_activations=True,
        )
        for row in rows
    ]
    results = engine.explain_batch(batch, asked)
    raw = any(ATTRIBUTIONS in row.outputs for row in rows)
    plan = GradientPlan(results, [row.methods for row in rows], params, raw=raw, chunk=chunk_rows)
    done = run_gradient_plan(engine, plan, chunk_rows)
    return [dataclasses.replace(result, retained=()) for result in done]
