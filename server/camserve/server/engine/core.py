"""`CamEngine`: Grad-CAM-family explanations for a whole batch from one forward and one backward.

The engine is a facade over three parts, one concept each:

- `placement`: the device, precision and memory format the model runs in, decided once;
- `facts`: what the model is (its target layers per input size, from a cached probe pass; its
  state; whether its backward can be batched over classes, probed once at load);
- `explain_pass`: the pass itself, which costs about one forward pass: frozen parameters, a
  differentiable copy at each target layer, one `torch.autograd.grad` for every row and class,
  every method's maps from it (`registry`), one transfer to the host.

`predict` and `predict_tail` run forward-only rows (the follow-up work of `gradient_free` and
`scoring`), each with one synchronisation; `tail_fraction` and `method_costs` say what the
rows after a layer cost.

Ownership and threads: the engine owns the model it is given. It moves it to the device, puts it
in eval mode and freezes its parameters; `explain_batch` and `predict` refuse to run if it is
later put back in train mode or unfrozen. One engine serves one caller at a time (an internal lock
serialises concurrent calls); different engines on different models may run in parallel threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from camserve.server.engine import augment, transfer
from camserve.server.engine.activations import Nonlinearities
from camserve.server.engine.costs import MethodCost, method_cost
from camserve.server.engine.explain_pass import ExplainPass
from camserve.server.engine.facts import ModelFacts, check_logits
from camserve.server.engine.gradient_rows import SaliencyParams
from camserve.server.engine.layers import probe_input
from camserve.server.engine.layouts import LayoutHints, declared_hints
from camserve.server.engine.placement import GRAD_SCALES, PRECISIONS, Placement
from camserve.server.engine.registry import BY_NAME, NAMES, REGISTRY
from camserve.server.engine.rows import (
    check_activations,
    check_batch,
    check_images,
    check_row,
    row_images,
)
from camserve.server.engine.tail import Tail, Tails
from camserve.server.engine.tracing import MODEL_CALLS
from camserve.server.engine.types import EngineError, LayerSpec, RowRequest, RowResult

__all__ = ["GRAD_SCALES", "PRECISIONS", "CamEngine"]


def _check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    if (
        len(input_size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in input_size)
        or min(input_size) < 1
    ):
        raise EngineError(f"input_size must be (height, width) positive ints, got {input_size!r}")
    return (input_size[0], input_size[1])


class CamEngine:
    """Explains batches of images for one model on one device. See the module docstring.

    `layouts` overrides what the engine detects about the layers' layouts (see
    `camserve.server.engine.layouts`); what it leaves unset comes from the model itself.
    `channels_last` None lets the engine choose (`placement`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        precision: str = "float32",
        channels_last: bool | None = None,
        layouts: LayoutHints | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EngineError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        hints = (layouts or LayoutHints()).over(declared_hints(model))
        self._placement = Placement(device, precision, channels_last)
        self._facts = ModelFacts(model, hints, self._placement)
        self._model = self._placement.place(model)
        self._lock = threading.Lock()
        self._pass = ExplainPass(self._model, self._placement, self._facts)
        self._tails = Tails(self._model, to_device=self._placement.to_layout)

    @property
    def model(self) -> nn.Module:
        """The model the engine owns (eval mode, frozen, on `device`); do not modify it."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._placement.device

    @property
    def precision(self) -> str:
        return self._placement.precision

    @property
    def channels_last(self) -> bool:
        return self._placement.memory_format == torch.channels_last

    @property
    def batched_grads(self) -> bool | None:
        """Whether the backward is batched over classes (vmap); None until the first probe."""
        return self._facts.batched_grads

    # ----------------------------------------------------------------------------- model facts

    def layers(self, input_size: tuple[int, int]) -> list[LayerSpec]:
        """Every valid target layer at `input_size` (height, width), in forward order."""
        with self._lock, MODEL_CALLS.running():
            return self._facts.probe(_check_input_size(input_size)).specs()

    def default_layer(self, input_size: tuple[int, int]) -> str:
        """The layer explained when a request names none (rule: `camserve.server.engine.layers`)."""
        with self._lock, MODEL_CALLS.running():
            return self._facts.probe(_check_input_size(input_size)).default_layer()

    def num_classes(self, input_size: tuple[int, int]) -> int:
        """The length of the model's logits for an input of `input_size` (height, width).

        A method rather than a property because it takes a probe pass (cached per size).
        """
        with self._lock, MODEL_CALLS.running():
            found = self._facts.probe(_check_input_size(input_size))
        shape = found.output_shape
        if shape is None or len(shape) != 2:
            raise EngineError(
                f"the model returns {shape if shape else 'a non-tensor'}, not (N, num_classes) "
                "logits; camserve explains classifiers"
            )
        return int(shape[1])

    # ------------------------------------------------------------------------------ inference

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), float32 on the CPU, from an inference-mode forward pass."""
        images = check_images(batch)
        with self._lock, MODEL_CALLS.running():
            self._facts.check_state()

            def forward(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return self._model(x)

            logits = self._placement.run(forward, images)
            check_logits(logits, int(images.shape[0]))
            (host,) = transfer.to_host([logits.float()])
            return host

    def explain_batch(self, batch: torch.Tensor, rows: Sequence[RowRequest]) -> list[RowResult]:
        """Predictions and maps for each image of `batch` (N, 3, H, W), one RowRequest per image.

        Rows may name different layers, methods, classes and options; the union of their layers
        is hooked and each row gets only the methods it asked for. Maps are float32 on the CPU,
        ReLU'd, not normalised, at feature resolution (at input resolution with aug_smooth, whose
        six copies per image join the same pass). Rows with keep_activations also get
        `RowResult.retained` for the gradient-free methods.
        """
        rows = list(rows)
        images = check_batch(batch, rows)
        for index, row in enumerate(rows):
            check_row(index, row)
        input_hw = (int(images.shape[2]), int(images.shape[3]))
        expansion = augment.expand(images, rows)
        with self._lock, MODEL_CALLS.running():
            self._facts.check_state()
            with torch.inference_mode(False), torch.enable_grad():
                results = self._pass.run(expansion, input_hw)
        return augment.collapse(expansion, results, input_hw)

    def predict_tail(
        self,
        layer: str,
        activations: torch.Tensor,
        images: torch.Tensor,
        image_index: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (R, num_classes), float32 on the CPU, of the model run from `layer` onwards.

        `activations` (R, C, h, w) stand in for the layer's output; only the modules after the
        layer run (`camserve.server.engine.tail`), in inference mode. `images` (B, 3, H, W) are
        the inputs the rows' activations came from and row r's is `images[image_index[r]]`
        (default: B == R, one per row, or B == 1, shared): the input size selects the split, and
        a model that cannot be split runs its full forward on them with the layer's output
        replaced (logged once per engine). The model may overwrite `activations` in place.
        """
        rows = check_activations(activations)
        pictures = check_images(images)
        index = row_images(image_index, rows, int(pictures.shape[0]))
        input_hw = (int(pictures.shape[2]), int(pictures.shape[3]))
        with self._lock, MODEL_CALLS.running():
            self._facts.check_state()
            tail = self._tail(layer, input_hw)
            if tuple(activations.shape[1:]) != tail.shape:
                raise EngineError(
                    f"activations have shape {tuple(activations.shape)} but layer {layer!r} "
                    f"outputs {tail.shape} at {input_hw[0]}x{input_hw[1]}; pass rows of that "
                    "layer's output for images of that size"
                )
            logits = self._tails.run(tail, activations.detach(), pictures, index)
            check_logits(logits, rows)
            (host,) = transfer.to_host([logits.float()])
            return host

    def tail_fraction(self, layer: str, input_size: tuple[int, int]) -> float:
        """The FLOPs after `layer` over those of a whole forward pass at `input_size`: what one
        ablated row costs in forward passes (1.0 when the model cannot be split)."""
        input_hw = _check_input_size(input_size)
        with self._lock, MODEL_CALLS.running():
            self._facts.check_state()
            return self._tails.fraction(self._tail(layer, input_hw), input_hw)

    def method_costs(
        self, layer: str, input_size: tuple[int, int], *, aug_smooth: bool = False
    ) -> dict[str, MethodCost]:
        """Every method's cost per image at `layer` (`camserve.server.engine.costs`), SmoothGrad's
        and Integrated Gradients' at their default copies and steps.

        The tail is measured (a trace and a FLOP count) only when a method that runs it can
        explain the layer's layout; otherwise its rows are priced as whole forward passes.
        """
        input_hw = _check_input_size(input_size)
        with self._lock, MODEL_CALLS.running():
            spec = self._facts.spec(layer, input_hw)
        runs_tail = any(m.runs_tail and m.accepts(spec.layout) for m in REGISTRY)
        fraction = self.tail_fraction(layer, input_size) if runs_tail else 1.0
        channels = spec.shape[0]
        defaults = SaliencyParams()
        return {
            method: method_cost(
                method,
                channels=channels,
                tail_fraction=fraction,
                aug_smooth=aug_smooth,
                gradient_rows=defaults.rows(BY_NAME[method]),
            )
            for method in NAMES
        }

    def nonlinearities(self, input_size: tuple[int, int]) -> Nonlinearities:
        """How the model writes its nonlinearities, which decides whether the guided methods
        apply (`camserve.server.engine.activations`); one probe forward, cached."""
        input_hw = _check_input_size(input_size)
        with self._lock, MODEL_CALLS.running():
            self._facts.check_state()
            return self._pass.nonlinearities(input_hw)

    def _tail(self, layer: str, input_hw: tuple[int, int]) -> Tail:
        """`layer`'s tail at `input_hw` (`camserve.server.engine.tail.Tails`)."""
        found = self._tails.cached(layer, input_hw)
        if found is not None:
            return found
        shape = self._facts.spec(layer, input_hw).shape
        return self._tails.build(layer, shape, probe_input(input_hw))
