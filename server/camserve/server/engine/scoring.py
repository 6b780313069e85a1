"""Faithfulness scores for many maps as forward-only rows, in chunks a batcher can schedule.

A `ScorePlan` lays out every forward row the requested scores need (definitions in
`faithfulness`) for M maps over N images, builds any contiguous range of them on the device, and
collects the logits the model returns for them. Nothing about a row depends on which chunk it is
built in or on what else shares its forward pass, so a runtime may submit the chunks as
forward-only work items in any order, batched with other requests' rows:

    rows = forward_rows(scores, num_maps, steps)        # admission, before explain runs
    plan = ScorePlan(images, maps, image_index=..., classes=..., logits=..., scores=...)
    for chunk in plan.chunks(max_rows):
        plan.record(chunk, forward(plan.build(chunk)))   # forward: (R, 3, H, W) -> (R, C) logits
    per_map = plan.results()                             # one MapScores per map

`run_scores` is that loop, synchronously; `plan_from_results` builds a plan straight from
`CamEngine.explain` results.

Row layout: row 0 is the all-baseline image when a curve is asked for (shared by every map),
then for each map in order: its masked image (`confidence_change`), its S - 1 interior deletion
steps, its S - 1 interior insertion steps.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from camserve.server.engine.faithfulness import (
    CURVE_SCORES,
    DEFAULT_STEPS,
    SCORES,
    area_under_curve,
    check_steps,
    confidence_change,
    curve_images,
    masked_images,
    saliency_ranks,
    step_counts,
    step_fractions,
)
from camserve.server.engine.jobs import ForwardJob
from camserve.server.engine.shaping import normalise, to_input
from camserve.server.engine.types import EngineError, ModelFault, RowResult

# Row kinds in the plan's row table.
_BASELINE, _MASKED, _DELETION, _INSERTION = 0, 1, 2, 3

MapKey = tuple[int, str, int]  # (image index, method, class) of a map from CamEngine.explain
DEFAULT_CHUNK_ROWS = 32  # rows per job when the plan is not told otherwise


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve: probabilities at the fractions of pixels perturbed."""

    fractions: tuple[float, ...]  # x_0 = 0 ... x_S = 1
    probabilities: tuple[float, ...]
    auc: float


@dataclass(frozen=True)
class MapScores:
    """One map's scores; those not asked for are None.

    `probability` is the class's probability on the unperturbed image and `masked_probability`
    on the image times the map, so p_masked - p (pytorch-grad-cam's absolute change) is at hand.
    """

    probability: float
    confidence_change: float | None = None
    masked_probability: float | None = None
    deletion: Curve | None = None
    insertion: Curve | None = None

    @property
    def deletion_auc(self) -> float | None:
        return None if self.deletion is None else self.deletion.auc

    @property
    def insertion_auc(self) -> float | None:
        return None if self.insertion is None else self.insertion.auc

    def values(self) -> dict[str, float]:
        """The scores asked for, by wire name, in `SCORES` order."""
        found = {
            "confidence_change": self.confidence_change,
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
        }
        return {name: value for name, value in found.items() if value is not None}


def check_scores(scores: object) -> tuple[str, ...]:
    """`scores` once checked to be a non-empty sequence of distinct names from `SCORES`."""
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) or not scores:
        raise EngineError(
            f"scores must be a non-empty tuple of score names from {SCORES}, got {scores!r}"
        )
    for name in scores:
        if name not in SCORES:
            raise EngineError(f"scores: unknown score {name!r}; choose from {SCORES}")
    if len(set(scores)) != len(scores):
        raise EngineError(f"scores lists a score twice: {tuple(scores)!r}; list each once")
    return tuple(scores)


def forward_rows(scores: Sequence[str], num_maps: int, steps: int = DEFAULT_STEPS) -> int:
    """The forward rows a `ScorePlan` for `num_maps` maps will run: what admission should count.

    Per map: 1 for `confidence_change`, S - 1 per curve; plus 1 shared baseline row if any curve.
    """
    wanted = check_scores(scores)
    steps = check_steps(steps)
    if not isinstance(num_maps, int) or isinstance(num_maps, bool) or num_maps < 0:
        raise EngineError(f"num_maps must be an int >= 0, got {num_maps!r}")
    curves = sum(name in wanted for name in CURVE_SCORES)
    per_map = int("confidence_change" in wanted) + curves * (steps - 1)
    return num_maps * per_map + int(curves > 0 and num_maps > 0)


def _check_images(images: object) -> torch.Tensor:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[0] == 0
        or not images.is_floating_point()
    ):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise EngineError(
            f"images must be (N, C, H, W) floats with N >= 1, got {got}; pass the normalised "
            "batch that was explained"
        )
    return images


def _index_list(name: str, values: Sequence[int], length: int, bound: int, what: str) -> list[int]:
    values = list(values)
    if len(values) != length:
        raise EngineError(f"{name} has {len(values)} entries but there are {length} maps; one each")
    for i, value in enumerate(values):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
            raise EngineError(f"{name}[{i}] must be {what} in 0..{bound - 1}, got {value!r}")
    return values


class ScorePlan:
    """Every forward row that `scores` need for `maps`, and their results. See the module doc.

    `images` (N, C, H, W) are the normalised model inputs; `maps` (M, H, W) the normalised maps at
    input resolution, in [0, 1]; map m belongs to image `image_index[m]` and explains class
    `classes[m]`; `logits` (N, num_classes) are the model's logits for the unperturbed images (the
    explanation's own, so the curves' image ends cost no extra row). Rows are built on `device`
    (default: the images' device). `record` may be called from several threads.
    """

    def __init__(
        self,
        images: torch.Tensor,
        maps: torch.Tensor,
        *,
        image_index: Sequence[int],
        classes: Sequence[int],
        logits: torch.Tensor,
        scores: Sequence[str],
        steps: int = DEFAULT_STEPS,
        device: torch.device | str | None = None,
        chunk: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self._scores = check_scores(scores)
        self._chunk = chunk
        images = _check_images(images)
        count, _, height, width = (int(side) for side in images.shape)
        self._input_hw = (height, width)
        num_maps = self._check_maps(maps)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != count:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise EngineError(
                f"logits must be (N, num_classes) for the N = {count} images, got {got}; stack "
                "the explanation's RowResult.logits"
            )
        self._num_classes = int(logits.shape[1])
        image_of = _index_list("image_index", image_index, num_maps, count, "an image index")
        class_of = _index_list("classes", classes, num_maps, self._num_classes, "a class index")
        self._curves = [name in self._scores for name in CURVE_SCORES]
        self._steps = check_steps(steps, height * width if any(self._curves) else None)
        self._device = torch.device(device) if device is not None else images.device

        with torch.no_grad():
            self._images = images.detach().to(self._device)
            self._maps = maps.detach().to(self._device, dtype=torch.float32)
            self._ranks = saliency_ranks(self._maps) if any(self._curves) else None
        self._image_of = torch.tensor(image_of, dtype=torch.int64)
        self._image_of_device = self._image_of.to(self._device)
        self._classes = torch.tensor(class_of, dtype=torch.int64)
        log_p = torch.log_softmax(logits.detach().double().cpu(), dim=1)
        self._log_original = log_p[self._image_of, self._classes]
        self._layout()
        self._lock = threading.Lock()
        self._done = torch.zeros(self.rows, dtype=torch.bool)
        self._log_baseline: torch.Tensor | None = None  # (num_classes,)
        self._log_masked = torch.full((num_maps,), float("nan"), dtype=torch.float64)
        self._log_curves = torch.full(
            (2, num_maps, self._steps + 1), float("nan"), dtype=torch.float64
        )

    # ------------------------------------------------------------------------------ facts

    @property
    def rows(self) -> int:
        """How many forward rows the plan runs (`forward_rows` of the same arguments)."""
        return int(self._kind.shape[0])

    @property
    def num_maps(self) -> int:
        return int(self._maps.shape[0])

    @property
    def maps(self) -> torch.Tensor:
        """The maps being scored (M, H, W), float32 on the plan's device."""
        return self._maps

    @property
    def scores(self) -> tuple[str, ...]:
        return self._scores

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def complete(self) -> bool:
        """Whether every row's logits have been recorded."""
        with self._lock:
            return bool(self._done.all())

    def chunks(self, max_rows: int) -> list[range]:
        """Consecutive row ranges of at most `max_rows` rows covering the plan."""
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise EngineError(f"max_rows must be an int >= 1, got {max_rows!r}")
        return [range(s, min(s + max_rows, self.rows)) for s in range(0, self.rows, max_rows)]

    # --------------------------------------------------------------- the FollowUpPlan protocol

    def cost(self) -> int:
        """Forward passes: one per row, the rows being model inputs."""
        return self.rows

    def jobs(self, max_rows: int | None = None) -> list[ForwardJob]:
        """The rows in chunks of at most `max_rows` (default: the plan's `chunk`), as jobs."""
        size = self._input_hw
        return [
            ForwardJob(
                key=("inputs", size),
                rows=len(rows),
                cost=len(rows),
                build=functools.partial(self.build, rows),
                record=functools.partial(self.record, rows),
            )
            for rows in self.chunks(max_rows or self._chunk)
        ]

    def finish(self) -> list[MapScores]:
        return self.results()

    # ------------------------------------------------------------------------ build, record

    def build(self, rows: range) -> torch.Tensor:
        """The perturbed images of `rows` (R, C, H, W), on the plan's device, without autograd."""
        start, stop = self._check_range(rows)
        kind = self._kind[start:stop]
        map_of = self._map_of[start:stop]
        with torch.inference_mode():
            out = torch.zeros(
                (stop - start, *self._images.shape[1:]),
                dtype=self._images.dtype,
                device=self._device,
            )  # baseline rows stay zero
            masked = torch.nonzero(kind == _MASKED).flatten()
            if masked.numel():
                m = map_of[masked].to(self._device)
                picked = self._images[self._image_of_device[m]]
                out[masked.to(self._device)] = masked_images(picked, self._maps[m])
            curve = torch.nonzero((kind == _DELETION) | (kind == _INSERTION)).flatten()
            if curve.numel():
                assert self._ranks is not None
                at = start + curve
                m = map_of[curve].to(self._device)
                out[curve.to(self._device)] = curve_images(
                    self._images[self._image_of_device[m]],
                    self._ranks[m],
                    self._count[at].to(self._device),
                    (self._kind[at] == _INSERTION).to(self._device),
                )
        return out

    def record(self, rows: range, logits: torch.Tensor) -> None:
        """Takes the model's logits (R, num_classes) for the images `build(rows)` returned."""
        start, stop = self._check_range(rows)
        expected = (stop - start, self._num_classes)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise EngineError(
                f"logits for rows {start}..{stop - 1} must have shape {expected}, got {got}; "
                "pass the model's output for exactly the images build(rows) returned"
            )
        log_p = torch.log_softmax(logits.detach().double().cpu(), dim=1)
        kind = self._kind[start:stop]
        map_of = self._map_of[start:stop]
        with self._lock:
            if bool(self._done[start:stop].any()):
                raise EngineError(
                    f"rows {start}..{stop - 1} overlap rows already recorded; record each chunk "
                    "once"
                )
            baseline = torch.nonzero(kind == _BASELINE).flatten()
            if baseline.numel():
                self._log_baseline = log_p[baseline[0]]
            masked = torch.nonzero(kind == _MASKED).flatten()
            m = map_of[masked]
            self._log_masked[m] = log_p[masked, self._classes[m]]
            for curve, code in enumerate((_DELETION, _INSERTION)):
                hit = torch.nonzero(kind == code).flatten()
                m = map_of[hit]
                self._log_curves[curve, m, self._step[start + hit]] = log_p[hit, self._classes[m]]
            self._done[start:stop] = True

    def results(self) -> list[MapScores]:
        """Each map's scores, in map order, once every row has been recorded."""
        with self._lock:
            missing = int((~self._done).sum())
            if missing:
                raise EngineError(
                    f"{missing} of the plan's {self.rows} rows have no logits yet; record every "
                    "chunk of plan.chunks() before asking for results"
                )
            log_curves = self._log_curves.clone()
            log_masked = self._log_masked.clone()
            log_baseline = self._log_baseline
        original = self._log_original.exp()
        change = masked_p = None
        if "confidence_change" in self._scores:
            change = confidence_change(self._log_original, log_masked)
            masked_p = log_masked.exp()
        curves: list[list[Curve] | None] = [None, None]
        if any(self._curves):
            assert log_baseline is not None
            fractions = step_fractions(self._input_hw[0] * self._input_hw[1], self._steps)
            at_baseline = log_baseline[self._classes]
            ends = (self._log_original, at_baseline)
            for curve, wanted in enumerate(self._curves):
                if not wanted:
                    continue
                log_curve = log_curves[curve]
                first, last = ends if curve == 0 else ends[::-1]
                log_curve[:, 0], log_curve[:, -1] = first, last
                probabilities = log_curve.exp()
                areas = area_under_curve(probabilities, fractions)
                curves[curve] = [
                    Curve(tuple(fractions.tolist()), tuple(p.tolist()), float(a))
                    for p, a in zip(probabilities, areas, strict=True)
                ]
        return [
            MapScores(
                probability=float(original[m]),
                confidence_change=None if change is None else float(change[m]),
                masked_probability=None if masked_p is None else float(masked_p[m]),
                deletion=None if curves[0] is None else curves[0][m],
                insertion=None if curves[1] is None else curves[1][m],
            )
            for m in range(self.num_maps)
        ]

    # -------------------------------------------------------------------------- internals

    def _check_maps(self, maps: object) -> int:
        hw = self._input_hw
        if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or tuple(maps.shape[1:]) != hw:
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise EngineError(
                f"maps must be (M, {hw[0]}, {hw[1]}), at the images' resolution, got {got}; "
                "bring them there with shaping.to_input"
            )
        if maps.shape[0] == 0 or not maps.is_floating_point():
            raise EngineError(
                f"maps must hold at least one float map, got shape {tuple(maps.shape)} of "
                f"{maps.dtype}"
            )
        if not bool(torch.isfinite(maps).all()):
            raise ModelFault(
                "maps hold NaN or Inf values: the model's activations or gradients at the layer "
                "are not finite, so the maps cannot be scored"
            )
        low, high = float(maps.min()), float(maps.max())
        if not (low >= 0.0 and high <= 1.0):
            raise EngineError(
                f"maps must be normalised to [0, 1], got values from {low} to {high}; apply "
                "shaping.normalise"
            )
        return int(maps.shape[0])

    def _layout(self) -> None:
        """The row table: kind, map, step and pixel count of every row."""
        interior = self._steps - 1
        kinds: list[int] = []
        steps: list[int] = []
        if "confidence_change" in self._scores:
            kinds.append(_MASKED)
            steps.append(0)
        for wanted, code in zip(self._curves, (_DELETION, _INSERTION), strict=True):
            if wanted:
                kinds += [code] * interior
                steps += list(range(1, interior + 1))
        num_maps = self.num_maps
        block = len(kinds)
        self._kind = torch.tensor(kinds, dtype=torch.int64).repeat(num_maps)
        self._step = torch.tensor(steps, dtype=torch.int64).repeat(num_maps)
        self._map_of = torch.arange(num_maps).repeat_interleave(block)
        if any(self._curves):
            zero = torch.zeros(1, dtype=torch.int64)
            self._kind = torch.cat([zero + _BASELINE, self._kind])
            self._step = torch.cat([zero, self._step])
            self._map_of = torch.cat([zero - 1, self._map_of])
            counts = step_counts(self._input_hw[0] * self._input_hw[1], self._steps)
            self._count = counts[self._step]

    def _check_range(self, rows: object) -> tuple[int, int]:
        if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start < rows.stop:
            raise EngineError(
                f"rows must be a non-empty range(start, stop) from plan.chunks(), got {rows!r}"
            )
        if rows.stop > self.rows:
            raise EngineError(
                f"rows {rows!r} reaches past the plan's {self.rows} rows; use plan.chunks()"
            )
        return rows.start, rows.stop


def run_scores(
    plan: ScorePlan, forward: Callable[[torch.Tensor], torch.Tensor], max_rows: int = 32
) -> list[MapScores]:
    """Runs every job of `plan`, in chunks of `max_rows`, through `forward` (images -> logits,
    e.g. CamEngine.predict): the jobs the server runs (`jobs.run_forward`)."""
    for job in plan.jobs(max_rows):
        job.record(forward(job.build()))
    return plan.finish()


def plan_from_results(
    images: torch.Tensor,
    results: Sequence[RowResult],
    scores: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    device: torch.device | str | None = None,
    chunk: int = DEFAULT_CHUNK_ROWS,
) -> tuple[ScorePlan, list[MapKey]]:
    """A plan scoring every map of `CamEngine.explain_batch(images, ...)`'s results, and each map's
    (image, method, class) key in plan order. Maps are upsampled and normalised on `device`."""
    images = _check_images(images)
    if len(results) != images.shape[0]:
        raise EngineError(
            f"results has {len(results)} entries but images holds {images.shape[0]}; pass the "
            "batch that was explained and its results"
        )
    target = torch.device(device) if device is not None else images.device
    input_hw = (int(images.shape[2]), int(images.shape[3]))
    keys: list[MapKey] = []
    raw: list[torch.Tensor] = []
    for index, result in enumerate(results):
        for (method, class_index), cam in result.maps.items():
            keys.append((index, method, class_index))
            raw.append(cam)
    if not raw:
        raise EngineError("results hold no maps to score; explain at least one method and class")
    # Maps of different layers differ in resolution: bring each to the input size first.
    maps = normalise(torch.stack([to_input(cam.to(target), input_hw) for cam in raw]))
    logits = torch.stack([result.logits for result in results])
    plan = ScorePlan(
        images,
        maps,
        image_index=[key[0] for key in keys],
        classes=[key[2] for key in keys],
        logits=logits,
        scores=scores,
        steps=steps,
        device=target,
        chunk=chunk,
    )
    return plan, keys
