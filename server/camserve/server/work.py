"""The work items a model's batcher carries.

Two kinds share one queue and one worker thread, so every request's work is batched with every
other's under the same bounds, deadlines and cancellation:

- `ImageJob`: one image to explain (a forward and a backward pass; six copies with aug_smooth);
- `ForwardJob` (`camserve.server.engine.jobs`): a chunk of forward-only rows a request needs
  after its explain pass, handed out by a follow-up plan: channels of AblationCAM or ScoreCAM,
  steps of a faithfulness curve. Rows are built on the worker thread, on the engine's device,
  from tensors the explain pass left there; jobs with the same `key` from any request are
  concatenated into one model call (`jobs.run_forward`), and each job records its own logits.

A job's `cost` is its work in forward passes of the whole model, rounded up: what admission
counts against the model's `max_queue` and what fills a batch up to `max_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camserve.server.engine import RowRequest
from camserve.server.engine.costs import explain_rows
from camserve.server.engine.jobs import ForwardJob


@dataclass(frozen=True)
class ImageJob:
    """One image's explain work: its model input and what to explain in it."""

    pixels: torch.Tensor  # (3, H, W): uint8 RGB, or float32 already normalised (`preprocess`)
    row: RowRequest

    @property
    def cost(self) -> int:
        return explain_rows(self.row.aug_smooth)


WorkItem = ImageJob | ForwardJob


def item_cost(item: WorkItem) -> int:
    return item.cost
