"""The work items a model's batcher carries.

Two kinds share one queue and one worker thread, so every request's work is batched with every
other's under the same bounds, deadlines and cancellation:

- `ImageJob`: one image to explain (a forward and a backward pass; six copies with aug_smooth);
- `ForwardJob` (`camserve.server.engine.jobs`): a chunk of forward-only rows a request needs
  after its explain pass, handed out by a follow-up plan: channels of AblationCAM or ScoreCAM,
  steps of a faithfulness curve. Rows are built on the worker thread, on the engine's device,
  from tensors the explain pass left there; jobs with the same `key` from any request are
  concatenated into one model call (`jobs.run_forward`), and each job records its own logits;
- `GradientJob` (`camserve.server.engine.gradient_rows`): rows with their gradient at the input
  after the pass (SmoothGrad's copies, Integrated Gradients' points), run like forward jobs in
  passes of at most the model's `max_gradient_rows`.

Rows whose gradient at the input is taken keep the whole network's activations, so they run
apart from other rows in passes of at most `max_gradient_rows` (`passes`), which bounds the
memory they take whatever the batch size; a batch that still runs out of memory is split and
retried like any other.

A job's `cost` is its work in forward passes of the whole model, rounded up: what admission
counts against the model's `max_queue` and what fills a batch up to `max_batch_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camserve.server.engine import RowRequest
from camserve.server.engine.costs import explain_rows, row_cost
from camserve.server.engine.gradient_rows import GradientJob
from camserve.server.engine.jobs import ForwardJob, chunk_sizes
from camserve.server.engine.registry import BY_NAME


@dataclass(frozen=True)
class ImageJob:
    """One image's explain work: its model input and what to explain in it."""

    pixels: torch.Tensor  # (3, H, W): uint8 RGB, or float32 already normalised (`preprocess`)
    row: RowRequest

    @property
    def cost(self) -> int:
        return explain_rows(self.row.aug_smooth) * row_cost(self.row.methods)

    @property
    def input_gradient(self) -> bool:
        """Whether its pass takes the gradient at the input (a pixel method made by the pass)."""
        return any(BY_NAME[m].input_gradient for m in self.row.methods)


WorkItem = ImageJob | ForwardJob | GradientJob


def passes(jobs: Sequence[ImageJob], max_gradient_rows: int) -> list[list[int]]:
    """The positions of `jobs` by explain pass: every job without an input gradient in one, the
    others in passes of at most `max_gradient_rows`."""
    plain = [i for i, job in enumerate(jobs) if not job.input_gradient]
    heavy = [i for i, job in enumerate(jobs) if job.input_gradient]
    found = [plain] if plain else []
    start = 0
    for size in chunk_sizes(len(heavy), max_gradient_rows):
        found.append(heavy[start : start + size])
        start += size
    return found


def item_cost(item: WorkItem) -> int:
    return item.cost
