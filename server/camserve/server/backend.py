"""The seam between a request's CPU side and its model side.

The pipeline (`camserve.server.pipeline`) decodes, validates and shapes; a `ModelBackend`
admits a request, batches its images with everyone else's, runs the engine and the follow-up
rows, and hands back each image's `RowResult`. In one process the backend is the model
registry itself (`camserve.server.compute.LocalBackend`); in the multi-process layout each
frontend holds a `camserve.server.remote.RemoteBackend` that sends the same call to the engine
process, pixels and maps crossing in shared memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from camserve.server.engine import MapScores, RowResult
from camserve.server.records import ModelMeta, ModelStatus
from camserve.server.validation import ExplainPlan

# (model, serving): a model turned failing or recovered, or the engine went away or came back.
HealthListener = Callable[[str, bool], None]


@dataclass(frozen=True)
class ComputedRequest:
    """One request's model-side answer: per image, its result and its maps' scores."""

    results: list[RowResult]
    scores: list[dict[tuple[str, int], MapScores]]
    queue_s: float
    compute_s: float  # the slowest batch its images ran in, plus its follow-up rows
    batch_size: int


class Admission(Protocol):
    """Room held for one request in its model's queue; `compute` uses it, leaving releases."""

    async def compute(
        self, pixels: Sequence[torch.Tensor], deadline: float | None
    ) -> ComputedRequest: ...


class ModelBackend(Protocol):
    """Where the models live: in this process, or in the engine process."""

    def statuses(self) -> list[ModelStatus]:
        """Every hosted model, loaded or not, in configuration order."""
        ...

    def status(self, name: str) -> ModelStatus:
        """The named (or default) model; ModelNotFound when it is not hosted."""
        ...

    def admit(self, meta: ModelMeta, plan: ExplainPlan) -> AbstractAsyncContextManager[Admission]:
        """Holds queue room for the request's whole cost; raises a ServiceError when refused."""
        ...

    async def conv_weights(self, model: str, layer: str) -> np.ndarray:
        """The float32 weights of one Conv2d layer."""
        ...

    async def start(self, on_health: HealthListener) -> None:
        """Loads the models (or connects to the process that has them)."""
        ...

    async def close(self) -> None:
        """Finishes accepted work, then releases everything."""
        ...
