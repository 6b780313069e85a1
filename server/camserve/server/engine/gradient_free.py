"""The methods made by forward-only rows after the explain pass (AblationCAM, ScoreCAM), as a
`jobs.FollowUpPlan`.

Each needs one extra model row per channel of the target layer, so a runtime must be able to
spread them over many batches, interleave them with other work and stop between chunks:

1. `CamEngine.explain_batch` with `RowRequest(keep_activations=True)` (and the row's other
   methods): predictions, classes, maps of the pass methods, and `RowResult.retained`, the image
   and layer output of each explained copy (six with aug_smooth), on the engine's device.
2. `ChannelPlan(results, methods, ...)`: one `FollowUp` per method and retained copy, holding
   the (K, C) score table to fill; its `jobs` cut the channels into chunks whose rows the
   method's registry entry builds (`ChannelRows`), through the tail or the whole model.
3. The jobs run (`jobs.run_forward`, from the server's batcher or `jobs.run_plan`), each
   recording its logits.
4. `ChannelPlan.finish`: the results with the maps added, (method, class) -> map, smoothed over
   the copies when the row asked for aug_smooth, and the retained tensors let go.

`explain_all` does all four synchronously, for tests, benchmarks and scripts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from camserve.server.engine.augment import smooth_maps
from camserve.server.engine.jobs import ForwardJob, run_plan, tail_cost
from camserve.server.engine.registry import NAMES, ROW_METHODS, ChannelRows, Method, needing_rows
from camserve.server.engine.registry import method as registered
from camserve.server.engine.types import (
    EngineError,
    LayerError,
    Retained,
    RowRequest,
    RowResult,
)

if TYPE_CHECKING:
    from camserve.server.engine.core import CamEngine

DEFAULT_CHUNK_ROWS = 64


@dataclass(eq=False)
class FollowUp:
    """One gradient-free method on one explained copy of an image: its rows and their scores."""

    method: str
    layer: str
    retained: Retained
    classes: tuple[int, ...]
    eigen_smooth: bool = False
    scores: torch.Tensor = field(init=False, repr=False)  # (K, C) logits; NaN until scored

    def __post_init__(self) -> None:
        entry = registered(self.method)
        if entry.rows is None:
            raise EngineError(
                f"method {self.method!r} is made by the explain pass, not by rows after it; "
                f"use one of {ROW_METHODS}"
            )
        if not entry.accepts(self.retained.layout):
            raise LayerError(
                f"{self.method} cannot explain layer {self.layer!r}, whose output is laid out "
                f"{self.retained.layout!r}; it takes layers laid out {sorted(entry.layouts)}"
            )
        self.entry: Method = entry
        self.work: ChannelRows = entry.rows
        self.scores = torch.full((len(self.classes), self.channels), math.nan)

    @property
    def channels(self) -> int:
        return int(self.retained.activation.shape[0])

    @property
    def key(self) -> tuple[object, ...]:
        """Pieces with equal keys can share one model call: same method and input size and,
        for the tail, same layer (rows of the whole model are plain inputs, whatever the
        layer)."""
        size = tuple(self.retained.image.shape[-2:])
        if self.entry.runs_tail:
            return (self.method, size, self.layer)
        return (self.method, size)

    @property
    def done(self) -> bool:
        return not bool(torch.isnan(self.scores).any())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The model rows for channels [start, stop), on the engine's device."""
        return self.work.build(self.retained.image, self.retained.activation, start, stop)

    def record(self, start: int, stop: int, logits: torch.Tensor) -> None:
        """Keeps the explained classes' logits (stop - start, num_classes) of those rows."""
        if logits.shape[0] != stop - start:
            raise EngineError(f"got {logits.shape[0]} logit rows for channels [{start}, {stop})")
        self.scores[:, start:stop] = logits[:, list(self.classes)].T.float().cpu()

    def maps(self) -> torch.Tensor:
        """The raw maps (K, h, w), float32 on the CPU at feature resolution, once every channel
        has been scored."""
        if not self.done:
            missing = int(torch.isnan(self.scores).any(dim=0).sum())
            raise EngineError(f"{self.method}: {missing} channels are not scored yet; run them")
        original = self.retained.logits[list(self.classes)]
        activation = self.retained.activation
        maps = self.work.maps(activation, original, self.scores, self.eigen_smooth)
        return maps.float().cpu()


def follow_ups(result: RowResult, method: str, *, eigen_smooth: bool = False) -> list[FollowUp]:
    """The work of `method` for an explained row: one FollowUp per retained copy."""
    if not result.retained:
        raise EngineError(
            f"{method} needs the row's activations: explain it with keep_activations=True"
        )
    return [
        FollowUp(method, result.layer, retained, result.classes, eigen_smooth)
        for retained in result.retained
    ]


def merge(
    result: RowResult, method: str, done: Sequence[FollowUp], input_hw: tuple[int, int]
) -> dict[tuple[str, int], torch.Tensor]:
    """(method, class) -> map for an explained row: the raw (h, w) map at feature resolution,
    or with aug_smooth (several copies) the smoothed (H, W) map, like `RowResult.maps`."""
    if len(done) != len(result.retained) or not done:
        raise EngineError(
            f"{method}: got {len(done)} follow-ups for {len(result.retained)} retained copies"
        )
    augmentations = [f.retained.augmentation for f in done]
    if len(done) == 1 and augmentations[0] is None:
        maps = done[0].maps()
    else:
        steps = [a for a in augmentations if a is not None]
        if len(steps) != len(done):
            raise EngineError(f"{method}: copies without their augmentation cannot be smoothed")
        maps = smooth_maps([f.maps() for f in done], steps, input_hw)
    return {(method, c): maps[k] for k, c in enumerate(result.classes)}


def _split_methods(index: int, row: RowRequest) -> tuple[tuple[str, ...], tuple[str, ...]]:
    methods = tuple(row.methods)
    for name in methods:
        if name not in NAMES:
            raise EngineError(
                f"rows[{index}].methods: unknown method {name!r}; choose from {NAMES}"
            )
    if len(set(methods)) != len(methods):
        raise EngineError(f"rows[{index}].methods lists a method twice: {methods!r}")
    single = tuple(m for m in methods if registered(m).produces.from_pass)
    free = tuple(m for m in methods if not registered(m).produces.from_pass)
    return single, free


def _jobs(follow_up: FollowUp, chunk: int, tail_fraction: float) -> list[ForwardJob]:
    """The follow-up's channels in chunks of at most `chunk` rows, as jobs."""
    image = follow_up.retained.image
    found = []
    for start in range(0, follow_up.channels, chunk):
        stop = min(start + chunk, follow_up.channels)
        tail = follow_up.entry.runs_tail
        found.append(
            ForwardJob(
                # Rows of the whole model are model inputs like any other rows of that size.
                key=follow_up.key if tail else ("inputs", tuple(image.shape[-2:])),
                rows=stop - start,
                cost=tail_cost(stop - start, tail_fraction) if tail else stop - start,
                build=functools.partial(follow_up.rows, start, stop),
                record=functools.partial(follow_up.record, start, stop),
                tail_layer=follow_up.layer if tail else "",
                image=image if tail else None,
            )
        )
    return found


class ChannelPlan:
    """The rows-after-the-pass methods of a batch's results, as one `FollowUpPlan`.

    `methods[i]` are the methods made by rows that result i needs (the others are ignored);
    `chunk` bounds a job's rows, `tail_fraction` prices a row through the tail.
    """

    def __init__(
        self,
        results: Sequence[RowResult],
        methods: Sequence[Sequence[str]],
        *,
        eigen_smooth: Sequence[bool],
        input_hw: tuple[int, int],
        chunk: int = DEFAULT_CHUNK_ROWS,
        tail_fraction: float = 1.0,
    ) -> None:
        if chunk < 1:
            raise EngineError(f"chunk must be >= 1, got {chunk}")
        self._results = list(results)
        self._input_hw = input_hw
        self._work: list[tuple[int, str, list[FollowUp]]] = []
        self._jobs: list[ForwardJob] = []
        for i, (result, names) in enumerate(zip(self._results, methods, strict=True)):
            for entry in needing_rows(tuple(names)):
                group = follow_ups(result, entry.name, eigen_smooth=eigen_smooth[i])
                self._work.append((i, entry.name, group))
                for follow_up in group:
                    self._jobs += _jobs(follow_up, chunk, tail_fraction)

    def cost(self) -> int:
        return sum(job.cost for job in self._jobs)

    def jobs(self) -> list[ForwardJob]:
        return list(self._jobs)

    def finish(self) -> list[RowResult]:
        """The results with every method's maps added and the retained tensors let go."""
        maps = [dict(result.maps) for result in self._results]
        for i, name, group in self._work:
            maps[i].update(merge(self._results[i], name, group, self._input_hw))
        return [
            dataclasses.replace(result, maps=maps[i], retained=())
            for i, result in enumerate(self._results)
        ]


def explain_all(
    engine: CamEngine,
    batch: torch.Tensor,
    rows: Sequence[RowRequest],
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> list[RowResult]:
    """`CamEngine.explain_batch` for rows whose methods may include those made by rows after
    the pass, run to the end synchronously: their jobs in batches of at most `chunk_rows` rows,
    through `jobs.run_plan` as the server runs them."""
    split = [_split_methods(i, row) for i, row in enumerate(rows)]
    asked = [
        dataclasses.replace(
            row, methods=single, keep_activations=row.keep_activations or bool(free)
        )
        for row, (single, free) in zip(rows, split, strict=True)
    ]
    results = engine.explain_batch(batch, asked)
    plan = ChannelPlan(  # run by rows here, so the tail's price does not matter
        results,
        [free for _, free in split],
        eigen_smooth=[row.eigen_smooth for row in rows],
        input_hw=(int(batch.shape[-2]), int(batch.shape[-1])),
        chunk=chunk_rows,
    )
    done = run_plan(engine, plan, chunk_rows)
    return [
        dataclasses.replace(done[i], retained=results[i].retained if row.keep_activations else ())
        for i, row in enumerate(rows)
    ]
