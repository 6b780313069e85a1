"""Forward-only work after an explain pass, as jobs, and the one way they run.

The extra work of AblationCAM, ScoreCAM and the faithfulness scores is a `FollowUpPlan`: built
from a batch's results, it states its `cost` in forward passes, hands out its `jobs`, and once
every job has run, `finish`es into what the request asked for. Plans are built and finished on
the thread that runs the engine (the server's model worker), so their device tensors stay there.

A `ForwardJob` is a chunk of rows: built on the device when its batch runs, recorded when its
logits come back. `run_forward` runs any jobs, one model call per key (jobs of any request that
share an input size, or a tail, go together); the server's batcher and the synchronous drivers
for tests and benchmarks (`run_plan`) both run jobs through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from camserve.server.engine.types import ModelFault

if TYPE_CHECKING:
    from camserve.server.engine.core import CamEngine

R_co = TypeVar("R_co", covariant=True)


@dataclass(eq=False)
class ForwardJob:
    """Forward-only rows, run in one model call with the jobs sharing its key.

    `tail_layer` empty: the rows are model inputs (N, 3, H, W). Otherwise they stand in for the
    output of that layer and only the modules after it run; `image` is then the model input they
    came from (the split of the model depends on the input size).
    """

    key: Hashable
    rows: int
    cost: int  # in forward passes of the whole model, rounded up
    build: Callable[[], torch.Tensor]
    record: Callable[[torch.Tensor], None]
    tail_layer: str = ""
    image: torch.Tensor | None = field(default=None, repr=False)


class FollowUpPlan(Protocol[R_co]):
    """Extra work after the explain pass: see the module docstring."""

    def cost(self) -> int:
        """The plan's work in forward passes: the sum of its jobs' costs."""
        ...

    def jobs(self) -> list[ForwardJob]:
        """Every job, each to run once, in any grouping."""
        ...

    def finish(self) -> R_co:
        """The plan's outcome, once every job has recorded its logits."""
        ...


def tail_cost(rows: int, tail_fraction: float) -> int:
    """What `rows` rows through a tail of `tail_fraction` of the model cost, in forward passes."""
    return max(1, math.ceil(rows * tail_fraction - 1e-9))


def chunk_sizes(rows: int, chunk: int) -> list[int]:
    """`rows` cut into chunks of at most `chunk`."""
    return [min(chunk, rows - start) for start in range(0, rows, chunk)]


def distinct_images(sources: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
    """For groups of rows given as (their input image, how many rows): the distinct images
    stacked once, and each row's index into them, as `CamEngine.predict_tail` takes them."""
    slots: dict[int, int] = {}
    images: list[torch.Tensor] = []
    index: list[int] = []
    for image, rows in sources:
        if id(image) not in slots:
            slots[id(image)] = len(images)
            images.append(image)
        index += [slots[id(image)]] * rows
    return torch.stack(images), index


def run_forward(engine: CamEngine, jobs: Sequence[ForwardJob]) -> dict[ForwardJob, ModelFault]:
    """Runs forward jobs, one model call per key, and hands each job its logits; a job whose
    logits are not finite records nothing and is returned with its fault instead."""
    faulted: dict[ForwardJob, ModelFault] = {}
    groups: dict[Hashable, list[ForwardJob]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    for group in groups.values():
        rows = torch.cat([job.build() for job in group])
        first = group[0]
        if first.tail_layer:
            sources = [(_image_of(job), job.rows) for job in group]
            logits = engine.predict_tail(first.tail_layer, rows, *distinct_images(sources))
        else:
            logits = engine.predict(rows)
        offset = 0
        for job in group:
            share = logits[offset : offset + job.rows]
            offset += job.rows
            if bool(torch.isfinite(share).all()):
                job.record(share)
            else:
                faulted[job] = ModelFault("its logits for this request's rows are not finite")
    return faulted


def _image_of(job: ForwardJob) -> torch.Tensor:
    assert job.image is not None, "tail jobs carry the input they came from"
    return job.image


class _Costed(Protocol):
    @property
    def cost(self) -> int: ...


J = TypeVar("J", bound=_Costed)


def waves(
    jobs: Sequence[J], limit: int, size: Callable[[J], int] = lambda j: j.cost
) -> list[list[J]]:
    """The jobs in order, in waves whose `size` (default: cost) adds up to at most `limit`; a
    wave holds at least one job."""
    found: list[list[J]] = []
    wave: list[J] = []
    for job in jobs:
        if wave and sum(map(size, wave)) + size(job) > limit:
            found.append(wave)
            wave = []
        wave.append(job)
    if wave:
        found.append(wave)
    return found


def run_plan(engine: CamEngine, plan: FollowUpPlan[R_co], max_rows: int) -> R_co:
    """Runs a plan to its end synchronously: its jobs in batches of at most `max_rows` rows
    (a larger job alone), each batch one `run_forward`, as the server's batcher runs them."""
    for batch in waves(plan.jobs(), max_rows, size=lambda job: job.rows):
        for fault in run_forward(engine, batch).values():
            raise fault
    return plan.finish()
