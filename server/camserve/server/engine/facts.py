"""What an engine knows of its model: its layers per input size (the probe), its state, and
whether its backward can be batched over classes.

The probe pass (`camserve.server.engine.layers`) runs once per input size and is cached; the
first one, at load, also tries one batched backward (`is_grads_batched`, i.e. vmap) over two
classes. A model with an op that vmap cannot run (a custom autograd Function that leaves torch)
then takes one backward per class for good; one whose batched backward worked keeps it, and a
later failure of it costs only that batch its speed (`explain_pass`), never the model its mode.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from camserve.server.engine.hooks import Capture
from camserve.server.engine.layers import (
    Probe,
    probe,
    probe_failed,
    probe_input,
    unknown_layer,
    unusable_layer,
)
from camserve.server.engine.layouts import NCHW, Layout, LayoutHints
from camserve.server.engine.placement import Placement
from camserve.server.engine.types import EngineError, LayerSpec, ModelFault


def check_hints(model: nn.Module, hints: LayoutHints) -> None:
    """Refuses a layout configured for a layer the model does not have, suggesting names."""
    modules = dict(model.named_modules())
    for name in hints.layers:
        if not name or name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise EngineError(
                f"a layout is configured for layer {name!r}, which is not a module of this "
                f"model{hint}"
            )


def batches_gradients(model: nn.Module, placement: Placement, input_hw: tuple[int, int]) -> bool:
    """Whether one backward of the model's logits can be batched over two classes (vmap)."""

    def backward(x: torch.Tensor) -> None:
        x = x.clone().requires_grad_()
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            return  # not a classifier: the engine refuses its logits elsewhere
        grad_outputs = torch.zeros((2, *logits.shape), dtype=logits.dtype, device=logits.device)
        grad_outputs[0, :, 0] = 1
        grad_outputs[1, :, -1] = 1
        torch.autograd.grad(logits, x, grad_outputs, is_grads_batched=True)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            placement.run(backward, probe_input(input_hw))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):
        return False
    return True


class ModelFacts:
    """The model's layers, state and gradient mode; see the module docstring."""

    def __init__(self, model: nn.Module, hints: LayoutHints, placement: Placement) -> None:
        check_hints(model, hints)
        self._model = model
        self._hints = hints
        self._placement = placement
        self._probes: dict[tuple[int, int], Probe] = {}
        self.batched_grads: bool | None = None  # probed with the first probe pass
        # Listed once: walking the module tree for every batch cost about 0.3 ms a batch for
        # a 7-module model. The engine owns the model, so its modules do not change.
        self._modules = tuple(model.modules())
        # torch's attention prefers sequence-first token outputs (see hooks._copy).
        self.sequence_first = any(
            isinstance(module, nn.MultiheadAttention) and module.batch_first
            for module in model.modules()
        )

    def probe(self, input_hw: tuple[int, int]) -> Probe:
        """The model's layers at `input_hw`, from a cached probe pass (forward and backward)."""
        found = self._probes.get(input_hw)
        if found is None:
            self.check_state()
            try:
                sample = probe_input(input_hw)
                found = self._placement.run(lambda x: probe(self._model, x, self._hints), sample)
            except Exception as exc:
                raise probe_failed(input_hw, exc) from exc
            self._probes[input_hw] = found
            if self.batched_grads is None:
                self.batched_grads = batches_gradients(self._model, self._placement, input_hw)
        return found

    def spec(self, layer: str, input_hw: tuple[int, int]) -> LayerSpec:
        """`layer` as a target at `input_hw`, or the LayerError that says why it is not one."""
        self.module(layer, input_hw)
        found = self.probe(input_hw)
        for spec in found.specs():
            if spec.name == layer:
                return spec
        raise unusable_layer(
            layer,
            "is not a target layer (it must run once per forward pass and output an "
            "(N, C, H, W) map)",
            found,
        )

    def module(self, name: str, input_hw: tuple[int, int]) -> nn.Module:
        try:
            return self._model.get_submodule(name)
        except AttributeError:
            raise unknown_layer(name, self.probe(input_hw)) from None

    def activation(self, capture: Capture, input_hw: tuple[int, int]) -> torch.Tensor:
        """The captured output of a target layer, or the LayerError saying why it has none."""
        name = capture.name
        if capture.calls == 0:
            raise unusable_layer(name, "did not run during the forward pass", self.probe(input_hw))
        if capture.calls > 1:
            raise unusable_layer(
                name,
                f"runs {capture.calls} times per forward pass (the model reuses this module), "
                "so it has no single feature map to explain",
                self.probe(input_hw),
            )
        if capture.problem is not None or capture.activation is None:
            reason = capture.problem or "produced no feature map"
            raise unusable_layer(name, reason, self.probe(input_hw))
        return capture.activation

    def layout(self, name: str, activation: torch.Tensor, input_hw: tuple[int, int]) -> Layout:
        """How to read layer `name`'s captured output as maps, as the probe found it.

        Refuses layers the probe shows give no maps (no patch grid, no gradient), and an output
        whose shape differs from the probe's at the same input size.
        """
        probed = self.probe(input_hw)
        layout = probed.target_layout(name)
        shape = tuple(activation.shape)
        if layout is None:
            if activation.dim() != 4:
                raise unusable_layer(
                    name,
                    f"outputs a tensor of shape {shape} that the probe pass at this input size "
                    "did not see",
                    probed,
                )
            return Layout(NCHW, shape[1], (shape[2], shape[3]))
        if shape[1:] != layout.item_shape:
            expected = ", ".join(map(str, layout.item_shape))
            raise unusable_layer(
                name,
                f"outputs a tensor of shape {shape}, but (N, {expected}) in the probe pass at the "
                "same input size (its shape depends on the data)",
                probed,
            )
        return layout

    def check_state(self) -> None:
        """Refuses to run a model that was put back in train mode or unfrozen."""
        if any(module.training for module in self._modules):
            raise ModelFault(
                "the engine's model was put back in train mode after the engine was built; the "
                "engine owns its model: call model.eval() again or build a new CamEngine"
            )
        if any(
            parameter is not None and parameter.requires_grad
            for module in self._modules
            for parameter in module._parameters.values()  # noqa: SLF001 - no generator chain
        ):
            raise ModelFault(
                "the engine's model has parameters with requires_grad=True; the engine owns its "
                "model and keeps it frozen: call model.requires_grad_(False) or build a new "
                "CamEngine"
            )


def check_logits(logits: object, batch_size: int) -> None:
    """Refuses a model output that is not (batch_size, num_classes) logits."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EngineError(
            f"the model must return logits of shape (N, num_classes), it returned {got}; "
            "camserve explains classifiers (wrap the model so forward returns logits)"
        )
