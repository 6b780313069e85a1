"""What each method costs per image, in rows and in forward passes: for admission and GetModel.

The explain pass (forward plus one backward from the target layer) counts as one forward pass;
it measured 1.00-1.07x a plain forward pass. Every single-pass method rides on it, so asking for
several costs no more than one (the eigen methods add a small SVD per map on the CPU). The
gradient-free methods add one forward-only row per channel C of the target layer (what each
method needs is stated by its `registry` entry):

- AblationCAM: rows that run only the modules after the layer, each costing `tail_fraction` of a
  forward pass (`CamEngine.tail_fraction`; 1.0 when the model cannot be split there);
- ScoreCAM: masked copies of the input through the whole model, one forward pass each.

Pixel attributions differentiate the whole network down to the input: their explain row costs
`GRADIENT_ROW_COST` forward passes (the backward computes activation gradients only, about a
forward's work), and SmoothGrad and Integrated Gradients add that much per copy or point (and
IG's baseline row), `gradient_rows` of them per image.

aug_smooth multiplies everything by the six augmented copies of each image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from camserve.server.engine.augment import AUGMENTATIONS
from camserve.server.engine.registry import BY_NAME, GRADIENT_ROW_COST, method
from camserve.server.engine.types import EngineError


@dataclass(frozen=True)
class MethodCost:
    """One image's work for one method."""

    explain_rows: int  # rows of the explain pass: 1, or 6 with aug_smooth
    follow_up_rows: int  # forward-only rows after it (gradient-free methods), 0 otherwise
    forward_passes: float  # all of it, in forward passes of the whole model

    @property
    def rows(self) -> int:
        """Rows the method puts through the model, whatever their size."""
        return self.explain_rows + self.follow_up_rows


def explain_rows(aug_smooth: bool) -> int:
    """The rows of one image's explain pass: 1, or its six augmented copies with aug_smooth."""
    return len(AUGMENTATIONS) if aug_smooth else 1


def row_cost(methods: Sequence[str]) -> int:
    """What one explain row of these methods costs in forward passes: 1, or
    `GRADIENT_ROW_COST` when the pass takes the gradient at the input for one of them."""
    return GRADIENT_ROW_COST if any(BY_NAME[m].input_gradient for m in methods) else 1


def method_cost(
    name: str,
    *,
    channels: int,
    tail_fraction: float,
    aug_smooth: bool = False,
    gradient_rows: int = 0,
) -> MethodCost:
    """The cost of method `name` per image at a layer with `channels` channels; a method made
    by gradient rows after the pass takes `gradient_rows` of them."""
    if channels < 1:
        raise EngineError(f"channels must be >= 1, got {channels}")
    if not 0.0 <= tail_fraction <= 1.0:
        raise EngineError(f"tail_fraction must be in [0, 1], got {tail_fraction}")
    copies = explain_rows(aug_smooth)
    entry = method(name)
    rows = entry.rows_per_copy(channels, gradient_rows)
    passes = entry.cost_per_copy(channels, tail_fraction, gradient_rows)
    return MethodCost(copies, copies * (rows - 1), copies * passes)
