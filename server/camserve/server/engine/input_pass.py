"""The explain pass's gradients at the input: plain, guided, or both, from its one forward.

When a row asks for a pixel attribution the pass makes its input a leaf that requires grad, so
autograd records the whole network (parameters stay frozen: nothing but the input and the
target layers is ever differentiated, and no parameter gets `.grad`). The backward then runs:

- one `autograd.grad` to the target layers and the input together, when no row needs the guided
  gradient, or when every row needing layer gradients also takes the guided gradient at the
  input and no ReLU ran after the target layers (the guide then changes nothing there);
- otherwise a plain backward to the layers (and the input, for plain attributions), then, from
  the same graph, a guided one to the input (`activations.Guide` switched on).

So Guided Grad-CAM takes one forward, and one backward plus, at most, the part of the network
after the target layer again; libraries run two forward and two backward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from camserve.server.engine.activations import Guide
from camserve.server.engine.methods import GRADCAM, flat_channels_last
from camserve.server.engine.registry import BY_NAME, UNGUIDED_PIXEL_METHODS, PixelMethod
from camserve.server.engine.saliency import upsampled_cam
from camserve.server.engine.types import EngineError, RowRequest

# (logits, targets, one-hot grad outputs, retain the graph) -> a gradient per target (or None).
Backward = Callable[
    [torch.Tensor, list[torch.Tensor], torch.Tensor, bool], list[torch.Tensor | None]
]


@dataclass(frozen=True)
class InputNeeds:
    """Which gradients at the input a batch's rows ask for."""

    plain: bool
    guided: bool

    @property
    def any(self) -> bool:
        return self.plain or self.guided


def input_needs(rows: Sequence[RowRequest]) -> InputNeeds:
    kinds = {BY_NAME[m].input_gradient for row in rows for m in row.methods}
    return InputNeeds(plain="plain" in kinds, guided="guided" in kinds)


@dataclass
class InputTape:
    """The pass's input leaf and guide, and the gradients it got (K, N, 3, H, W) float32."""

    leaf: torch.Tensor | None = None
    guide: Guide = field(default_factory=Guide)
    plain: torch.Tensor | None = None
    guided: torch.Tensor | None = None

    def check_guide(self) -> None:
        """Refuses a guided pass that met a nonlinearity the guided rule does not cover."""
        if self.guide.uncontrolled:
            kinds = ", ".join(sorted(set(self.guide.uncontrolled)))
            instead = " or ".join(UNGUIDED_PIXEL_METHODS)
            raise EngineError(
                f"guided backprop needs ReLU or ReLU6 nonlinearities; this pass ran {kinds}; "
                f"use {instead}"
            )


def make_leaf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, what the model runs on): a copy, so a model writing to its input in place leaves
    the leaf intact."""
    leaf = x.detach().requires_grad_()
    return leaf, leaf.clone()


def run_backward(
    backward: Backward,
    logits: torch.Tensor,
    layers: list[torch.Tensor] | None,
    tape: InputTape,
    needs: InputNeeds,
    one_hot: torch.Tensor,
) -> list[torch.Tensor | None] | None:
    """Fills `tape.plain` / `tape.guided` and returns the layers' gradients (None: not asked),
    in one backward or two (module docstring)."""
    leaf = tape.leaf
    if leaf is None or not needs.any:
        return None if layers is None else backward(logits, layers, one_hot, False)
    scale_free = [] if layers is None else list(layers)
    shared = needs.guided and not needs.plain and tape.guide.after_targets == 0
    if not needs.guided or shared:
        tape.guide.on = needs.guided
        found = backward(logits, [*scale_free, leaf], one_hot, False)
        setattr(tape, "guided" if needs.guided else "plain", found[-1])
        return found[:-1] if layers is not None else None
    layer_grads: list[torch.Tensor | None] | None = None
    first = [*scale_free, *([leaf] if needs.plain else [])]
    if first:
        tape.guide.on = False
        found = backward(logits, first, one_hot, True)
        if needs.plain:
            tape.plain = found[-1]
            found = found[:-1]
        layer_grads = found if layers is not None else None
    tape.guide.on = True
    (tape.guided,) = backward(logits, [leaf], one_hot, False)
    return layer_grads


def pixel_attributions(
    pixel: PixelMethod,
    tape: InputTape,
    activations: torch.Tensor,
    gradients: torch.Tensor | None,
    picked: torch.Tensor | None,
) -> torch.Tensor:
    """A pixel method's attributions (K, n, 3, H, W) for its group's rows."""
    assert tape.leaf is not None, "rows with pixel methods make the pass differentiate its input"
    assert pixel.attribution is not None, "methods made by the pass have an attribution"
    x, plain, guided = tape.leaf.detach(), tape.plain, tape.guided
    if picked is not None:
        x = x[picked]
        plain = None if plain is None else plain[:, picked]
        guided = None if guided is None else guided[:, picked]
    cam = None
    if pixel.uses_cam:
        assert gradients is not None, "a method using the Grad-CAM asks for the layer's gradients"
        fast = GRADCAM.fast
        assert fast is not None
        a = flat_channels_last(activations)
        cams = fast(a, flat_channels_last(gradients)).unflatten(-1, activations.shape[-2:])
        cam = upsampled_cam(cams, (int(x.shape[-2]), int(x.shape[-1])))
    return pixel.attribution(x, plain, guided, cam).float()
