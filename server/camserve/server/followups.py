"""A request's forward-only work after its explain pass: gradient-free maps and faithfulness
scores, run as `ForwardJob`s through the model's batcher.

- AblationCAM and ScoreCAM: each explained image (each augmented copy, with aug_smooth) needs one
  row per channel of the target layer (`engine.gradient_free`). Its channels are cut into pieces
  of at most `max_batch_size` rows; AblationCAM pieces run only the layers after the target.
- Scores: a `ScorePlan` over every map of the request (after the gradient-free maps are merged),
  cut into chunks of at most `max_batch_size` rows.

The jobs go to the batcher in waves of about one batch (`submit_in_waves`), so other requests'
work joins the queue between two waves of a large request instead of waiting behind all of it;
all of it was admitted up front (`request_cost`), so no wave is ever refused halfway.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from camserve.server.batcher import Reservation
from camserve.server.engine import (
    FollowUp,
    MapScores,
    RowResult,
    forward_rows,
    plan_from_results,
)
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.gradient_free import follow_ups, merge, pieces
from camserve.server.engine.registry import needing_rows
from camserve.server.engine.scoring import ScorePlan
from camserve.server.runtime import ModelRuntime
from camserve.server.validation import ExplainPlan
from camserve.server.work import ForwardJob, tail_cost

Work = list[tuple[int, str, list[FollowUp]]]  # (image, method, its follow-ups)


def _chunk_sizes(rows: int, chunk: int) -> list[int]:
    return [min(chunk, rows - start) for start in range(0, rows, chunk)]


def request_cost(
    plan: ExplainPlan,
    channels: int,
    tail_fraction: float,
    chunk: int,
) -> int:
    """The whole request's cost in forward passes, counted the way its jobs will be: explain
    rows, gradient-free pieces (AblationCAM's at the tail's share) and score rows."""
    copies = explain_rows(plan.aug_smooth)
    pieces_cost = sum(tail_cost(size, tail_fraction) for size in _chunk_sizes(channels, chunk))
    per_copy = sum(  # rows after the layer cost the tail's share, rows of the model one each
        pieces_cost if entry.runs_tail else channels for entry in needing_rows(plan.methods)
    )
    per_image = copies * (1 + per_copy)
    total = per_image * len(plan.targets)
    maps = sum((len(t.classes) or t.top_k) * len(plan.methods) for t in plan.targets)
    if plan.scores:
        total += forward_rows(plan.scores, maps, plan.score_steps)
    return total


def gradient_free_jobs(
    results: Sequence[RowResult], plan: ExplainPlan, chunk: int, tail_fraction: float
) -> tuple[Work, list[ForwardJob]]:
    """The follow-ups of every gradient-free method the plan asks for, and their jobs."""
    work: Work = []
    jobs: list[ForwardJob] = []
    for index, result in enumerate(results):
        for entry in needing_rows(plan.methods):
            group = follow_ups(result, entry.name, eigen_smooth=plan.eigen_smooth)
            work.append((index, entry.name, group))
            for piece in (p for follow_up in group for p in pieces(follow_up, chunk)):
                jobs.append(_piece_job(piece.follow_up, piece.start, piece.stop, tail_fraction))
    return work, jobs


def _piece_job(follow_up: FollowUp, start: int, stop: int, tail_fraction: float) -> ForwardJob:
    rows = stop - start
    image = follow_up.retained.image
    ablation = follow_up.entry.runs_tail
    return ForwardJob(
        # Rows of the whole model are model inputs like any other forward rows of that size.
        key=follow_up.key if ablation else ("inputs", tuple(image.shape[-2:])),
        rows=rows,
        cost=tail_cost(rows, tail_fraction) if ablation else rows,
        build=functools.partial(follow_up.rows, start, stop),
        record=functools.partial(follow_up.record, start, stop),
        tail_layer=follow_up.layer if ablation else "",
        image=image if ablation else None,
    )


def merged(results: Sequence[RowResult], work: Work, input_hw: tuple[int, int]) -> list[RowResult]:
    """The results with every gradient-free map added and the retained tensors let go."""
    maps = [dict(result.maps) for result in results]
    for index, method, group in work:
        maps[index].update(merge(results[index], method, group, input_hw))
    return [
        dataclasses.replace(result, maps=maps[i], retained=()) for i, result in enumerate(results)
    ]


def score_jobs(
    inputs: Sequence[torch.Tensor], results: Sequence[RowResult], plan: ExplainPlan, chunk: int
) -> tuple[ScorePlan, list[tuple[int, str, int]], list[ForwardJob]]:
    """A plan scoring every map of the request (its images' model inputs `inputs`), its map
    keys, and its chunks as jobs."""
    images = torch.stack(list(inputs))
    score_plan, keys = plan_from_results(images, results, plan.scores, steps=plan.score_steps)
    size = tuple(images.shape[-2:])
    jobs = [
        ForwardJob(
            key=("inputs", size),
            rows=len(rows),
            cost=len(rows),
            build=functools.partial(score_plan.build, rows),
            record=functools.partial(score_plan.record, rows),
        )
        for rows in score_plan.chunks(chunk)
    ]
    return score_plan, keys, jobs


def scores_by_image(
    score_plan: ScorePlan, keys: list[tuple[int, str, int]], images: int
) -> list[dict[tuple[str, int], MapScores]]:
    """Each image's map scores, keyed (method, class) like its maps."""
    found: list[dict[tuple[str, int], MapScores]] = [{} for _ in range(images)]
    for (index, method, class_index), value in zip(keys, score_plan.results(), strict=True):
        found[index][(method, class_index)] = value
    return found


async def submit_in_waves(
    runtime: ModelRuntime,
    jobs: list[ForwardJob],
    deadline: float | None,
    reservation: Reservation,
    wave_cost: int,
) -> float:
    """Runs `jobs` a wave of about `wave_cost` at a time; returns the compute seconds spent."""
    seconds = 0.0
    wave: list[ForwardJob] = []
    for job in jobs:
        if wave and sum(j.cost for j in wave) + job.cost > wave_cost:
            seconds += await runtime.run(wave, deadline, reservation)
            wave = []
        wave.append(job)
    if wave:
        seconds += await runtime.run(wave, deadline, reservation)
    return seconds
