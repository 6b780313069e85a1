"""A request's forward-only work after its explain pass, as follow-up plans run through the
model's batcher (`engine.jobs.FollowUpPlan`).

- Methods made by rows after the pass (AblationCAM, ScoreCAM): a `ChannelPlan` over the
  request's results, one row per channel of the target layer per explained copy, in jobs of at
  most `max_batch_size` rows; rows after the layer run only the modules that follow it.
- Pixel attributions made by rows after the pass (SmoothGrad, Integrated Gradients): a
  `GradientPlan` over the request's results, rows with their gradient at the input in jobs of
  at most the model's `max_gradient_rows`.
- Scores: a `ScorePlan` over every map of the request (after the rows-after-the-pass maps are
  merged), built from the model inputs the explain pass staged on the device.

Plans are built and finished on the model's worker thread (`ModelRuntime.on_worker`). Their jobs
go to the batcher in waves of about one batch (`submit_in_waves`), so other requests' work joins
the queue between two waves of a large request instead of waiting behind all of it; all of it
was admitted up front (`request_cost`), so no wave is ever refused halfway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camserve.server.batcher import Reservation
from camserve.server.engine import MapScores, RowResult, forward_rows, plan_from_results
from camserve.server.engine.augment import IDENTITY_INDEX
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.gradient_free import ChannelPlan
from camserve.server.engine.gradient_rows import GradientJob, GradientPlan, SaliencyParams
from camserve.server.engine.jobs import ForwardJob, chunk_sizes, tail_cost, waves
from camserve.server.engine.registry import GRADIENT_ROW_COST
from camserve.server.engine.scoring import ScorePlan
from camserve.server.runtime import ModelRuntime
from camserve.server.validation import ExplainPlan


def request_cost(plan: ExplainPlan, tail_fraction: float, chunk: int) -> int:
    """The whole request's cost in forward passes, priced from its budget the way its plans'
    jobs will count it: explain rows, rows after the pass (those through the tail at its share,
    per job of at most `chunk` rows; those with their input gradient at `GRADIENT_ROW_COST`)
    and score rows."""
    budget = plan.budget
    tail_jobs = sum(tail_cost(rows, tail_fraction) for rows in chunk_sizes(budget.channels, chunk))
    per_copy = explain_row_cost(plan) + budget.tail_methods * tail_jobs
    per_copy += budget.model_methods * budget.channels + GRADIENT_ROW_COST * budget.gradient_rows
    total = explain_rows(plan.aug_smooth) * per_copy * len(plan.targets)
    if plan.scores:
        total += forward_rows(plan.scores, budget.maps, plan.score_steps)
    return total


def explain_row_cost(plan: ExplainPlan) -> int:
    """One explain row's cost: `GRADIENT_ROW_COST` when it takes the gradient at the input."""
    return GRADIENT_ROW_COST if plan.budget.input_gradient else 1


def gradient_plan(
    results: Sequence[RowResult],
    plan: ExplainPlan,
    chunk: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> GradientPlan:
    """The plan of the request's SmoothGrad and Integrated Gradients maps."""
    options = plan.pixel
    params = SaliencyParams(
        samples=options.samples,
        noise=options.noise,
        seed=options.seed,
        steps=options.steps,
        quadrature=options.quadrature,
        baseline=options.baseline,
        reduction=options.reduction,
        mean=mean,
        std=std,
    )
    methods = [plan.methods] * len(results)
    return GradientPlan(results, methods, params, raw=plan.output.raw, chunk=chunk)


def channel_plan(
    results: Sequence[RowResult],
    plan: ExplainPlan,
    chunk: int,
    tail_fraction: float,
    input_hw: tuple[int, int],
) -> ChannelPlan:
    """The plan of every method the request asks for that rows after the pass make."""
    return ChannelPlan(
        results,
        [plan.methods] * len(results),
        eigen_smooth=[plan.eigen_smooth] * len(results),
        input_hw=input_hw,
        chunk=chunk,
        tail_fraction=tail_fraction,
    )


def staged_inputs(results: Sequence[RowResult]) -> list[torch.Tensor]:
    """Each image's model input as the engine staged it (its unaugmented copy's)."""
    return [
        result.retained[IDENTITY_INDEX if len(result.retained) > 1 else 0].image
        for result in results
    ]


def score_plan(
    inputs: Sequence[torch.Tensor], results: Sequence[RowResult], plan: ExplainPlan, chunk: int
) -> tuple[ScorePlan, list[tuple[int, str, int]]]:
    """A plan scoring every map of the request, from its images' staged model inputs, and its
    map keys."""
    images = torch.stack(list(inputs))
    return plan_from_results(images, results, plan.scores, steps=plan.score_steps, chunk=chunk)


def scores_by_image(
    scored: ScorePlan, keys: list[tuple[int, str, int]], images: int
) -> list[dict[tuple[str, int], MapScores]]:
    """Each image's map scores, keyed (method, class) like its maps."""
    found: list[dict[tuple[str, int], MapScores]] = [{} for _ in range(images)]
    for (index, method, class_index), value in zip(keys, scored.finish(), strict=True):
        found[index][(method, class_index)] = value
    return found


async def submit_in_waves(
    runtime: ModelRuntime,
    jobs: Sequence[ForwardJob | GradientJob],
    deadline: float | None,
    reservation: Reservation,
    wave_cost: int,
) -> float:
    """Runs `jobs` a wave of about `wave_cost` at a time; returns the compute seconds spent."""
    seconds = 0.0
    for wave in waves(jobs, wave_cost):
        seconds += await runtime.run(wave, deadline, reservation)
    return seconds
