"""Forward hooks, held as resources: registered on entry, removed on exit even if forward raises.

Two uses: `capture_targets` turns each target layer's output into a tensor autograd can
differentiate with respect to, and `record_outputs` watches every submodule once to learn which
layers exist, what they output, how often they run and (from the outputs it keeps) which of them
the logits depend on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class Capture:
    """What one target layer's hook saw during a forward pass."""

    name: str
    calls: int = 0
    activation: torch.Tensor | None = None  # the differentiable output, in the layer's layout
    problem: str | None = None  # why the output cannot be explained, if it cannot


def _copy(output: torch.Tensor, sequence_first: bool) -> torch.Tensor:
    """A copy of a target's output for the rest of the forward pass to use.

    Token sequences go sequence-first in memory when the model runs torch's batch-first
    `nn.MultiheadAttention`: once gradients flow it leaves its fused path, transposes its input
    to (L, N, E), and folds its input projection into one matrix product only if that view is
    contiguous; otherwise it runs one product per token (about 1.2x slower for a ViT-B block's
    forward and backward on the CPU).
    """
    if sequence_first and output.dim() == 3:
        return output.transpose(0, 1).contiguous().transpose(0, 1)
    return output.clone()


def _make_target_hook(capture: Capture, batch_size: int, sequence_first: bool) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        capture.calls += 1
        if capture.calls > 1:  # the engine refuses such layers after the pass
            return None
        if not isinstance(output, torch.Tensor):
            capture.problem = f"returns a {type(output).__name__}, not a tensor"
            return None
        if output.dim() not in (3, 4) or output.shape[0] != batch_size:
            capture.problem = (
                f"outputs a tensor of shape {tuple(output.shape)}, not a feature map (N, C, H, W) "
                f"or (N, H, W, C) or a token sequence (N, L, C) for the batch of {batch_size}"
            )
            return None
        if output.requires_grad:
            # An earlier target layer already put this output on the tape: differentiate with
            # respect to it directly so the chain back to that earlier layer stays intact.
            capture.activation = output
            return _copy(output, sequence_first)
        # With frozen parameters nothing before this point was recorded: start the tape here.
        # The clone keeps in-place ops that follow (ReLU(inplace=True)) off the saved tensor.
        leaf = output.detach().requires_grad_()
        capture.activation = leaf
        return _copy(leaf, sequence_first)

    return hook


@contextmanager
def capture_targets(
    modules: Mapping[str, nn.Module], batch_size: int, *, sequence_first: bool = False
) -> Iterator[dict[str, Capture]]:
    """Hooks each named module for one forward pass; yields name -> Capture.

    `sequence_first`: lay token outputs out sequence-first for what follows (see `_copy`).
    """
    captures = {name: Capture(name) for name in modules}
    handles: list[RemovableHandle] = []
    try:
        for name, module in modules.items():
            hook = _make_target_hook(captures[name], batch_size, sequence_first)
            handles.append(module.register_forward_hook(hook))
        yield captures
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class OutputEvent:
    """One completed module call: its name and output shape (None for a non-tensor output)."""

    name: str
    shape: tuple[int, ...] | None
    kind: str  # the output's type name, for messages
    module: str = ""  # the module's class name


@dataclass
class Recording:
    """Every module call of one forward pass, and each module's first tensor output."""

    events: list[OutputEvent] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def record_outputs(model: nn.Module) -> Iterator[Recording]:
    """Hooks every submodule (not the root); yields the calls in completion order.

    The outputs are kept (with their autograd history, if any) until the recording is dropped.
    """
    recording = Recording()
    handles: list[RemovableHandle] = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            shape = None
            if isinstance(output, torch.Tensor):
                shape = tuple(output.shape)
                recording.outputs.setdefault(name, output)
            event = OutputEvent(name, shape, type(output).__name__, type(module).__name__)
            recording.events.append(event)

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        yield recording
    finally:
        for handle in handles:
            handle.remove()
