"""The work items a model's batcher carries, and how a batch of them runs on the engine.

Two kinds share one queue and one worker thread, so every request's work is batched with every
other's under the same bounds, deadlines and cancellation:

- `ImageJob`: one image to explain (a forward and a backward pass; six copies with aug_smooth);
- `ForwardJob`: a chunk of forward-only rows a request needs after its explain pass: channels of
  AblationCAM or ScoreCAM, steps of a faithfulness curve. Rows are built on the worker thread,
  on the engine's device, from tensors the explain pass left there; jobs with the same `key`
  from any request are concatenated into one model call, and each job records its own logits.

A job's `cost` is its work in forward passes of the whole model, rounded up: what admission
counts against the model's `max_queue` and what fills a batch up to `max_batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from camserve.server.engine import CamEngine, ModelFault, RowRequest
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.gradient_free import distinct_images
from camserve.server.faults import finite


@dataclass(frozen=True)
class ImageJob:
    """One image's explain work: its model input and what to explain in it."""

    pixels: torch.Tensor  # (3, H, W): uint8 RGB, or float32 already normalised (`preprocess`)
    row: RowRequest

    @property
    def cost(self) -> int:
        return explain_rows(self.row.aug_smooth)


@dataclass(eq=False)
class ForwardJob:
    """Forward-only rows of one request, run in one model call with the jobs sharing its key.

    `tail_layer` empty: the rows are model inputs (N, 3, H, W). Otherwise they stand in for the
    output of that layer and only the modules after it run; `image` is then the model input they
    came from (the split of the model depends on the input size).
    """

    key: Hashable
    rows: int
    cost: int
    build: Callable[[], torch.Tensor]
    record: Callable[[torch.Tensor], None]
    tail_layer: str = ""
    image: torch.Tensor | None = field(default=None, repr=False)


def tail_cost(rows: int, tail_fraction: float) -> int:
    """What `rows` rows through a tail of `tail_fraction` of the model cost, in forward passes."""
    return max(1, math.ceil(rows * tail_fraction - 1e-9))


WorkItem = ImageJob | ForwardJob


def item_cost(item: WorkItem) -> int:
    return item.cost


def run_forward(engine: CamEngine, jobs: list[ForwardJob]) -> dict[ForwardJob, ModelFault]:
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
            logits = engine.predict_tail(first.tail_layer, rows, *_tail_inputs(group))
        else:
            logits = engine.predict(rows)
        offset = 0
        for job in group:
            share = logits[offset : offset + job.rows]
            offset += job.rows
            if finite(share):
                job.record(share)
            else:
                faulted[job] = ModelFault("its logits for this request's rows are not finite")
    return faulted


def _tail_inputs(group: list[ForwardJob]) -> tuple[torch.Tensor, list[int]]:
    """The distinct input images of a tail group, and each row's index into them."""
    sources: list[tuple[torch.Tensor, int]] = []
    for job in group:
        assert job.image is not None, "tail jobs carry the input they came from"
        sources.append((job.image, job.rows))
    return distinct_images(sources)
