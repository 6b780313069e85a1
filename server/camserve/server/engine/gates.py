"""Attention gates: the modules whose outputs scale a network's channels or positions.

Squeeze-and-excitation blocks (torchvision's `SqueezeExcitation`, timm's SE and EffectiveSE),
CBAM's channel and spatial attention, and users' own gate modules all end in a gate: a tensor of
shape (N, C, 1, 1) (one weight per channel) or (N, 1, H, W) (one weight per position), with
values in [0, 1], by which the block multiplies its input. One forward pass at the model's input
size, with a hook on every module, finds them from what they output:

- the output is gate-shaped for the probe's batch, with C > 1 channels or H * W > 1 positions;
- every value lies in [0, 1];
- the module is a sigmoid-family activation (`nn.Sigmoid`, `nn.Hardsigmoid`, timm's hard
  sigmoids: any class whose name says sigmoid), or a module of the user's own (a class from
  outside torch, torchvision and timm). Library modules that only happen to output small
  non-negative (N, C, 1, 1) tensors with random weights, such as the ReLU inside a squeeze block
  or a pooling layer, are not gates;
- the module runs exactly once per pass (a gate activation shared by several blocks has no
  single value to show);
- a module whose output is the very tensor one of its children returned (a user's gate module
  ending in its `nn.Sigmoid`) is the same gate: the innermost module is listed.

A gate computed with a functional call inside a module that multiplies it away at once
(`x * torch.sigmoid(...)`) leaves no module output to find, and is not listed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from camserve.server.engine.layers import probe_input
from camserve.server.engine.tracing import MODEL_CALLS
from camserve.server.records import GateSpec

CHANNEL, SPATIAL = "channel", "spatial"
LIBRARIES = frozenset({"torch", "torchvision", "timm"})


def may_gate(module: nn.Module) -> bool:
    """Whether `module`'s output may be a gate: a sigmoid-family activation, or a user's own
    module (see the module docstring)."""
    kind = type(module)
    return "sigmoid" in kind.__name__.lower() or kind.__module__.split(".")[0] not in LIBRARIES


def gate_kind(output: Any, batch: int) -> tuple[str, tuple[int, ...]] | None:
    """(kind, per-image shape) when `output` is a gate for a batch of `batch`, else None."""
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[0] != batch:
        return None
    _, channels, height, width = (int(d) for d in output.shape)
    shape: tuple[int, ...]
    if height == width == 1 and channels > 1:
        kind, shape = CHANNEL, (channels,)
    elif channels == 1 and height * width > 1:
        kind, shape = SPATIAL, (height, width)
    else:
        return None
    if not output.is_floating_point():
        return None
    low, high = torch.aminmax(output.detach().float())
    return (kind, shape) if float(low) >= 0.0 and float(high) <= 1.0 else None


def find_gates(model: nn.Module, input_hw: tuple[int, int]) -> tuple[GateSpec, ...]:
    """The gates of `model` (on its own device and dtype) in the order they run."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    sample = probe_input(input_hw).to(device=device, dtype=dtype)
    batch = int(sample.shape[0])
    calls: Counter[str] = Counter()
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    # Outputs an inner module already listed, kept alive so that their ids stay theirs.
    claimed: dict[int, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] += 1
            if not may_gate(module) or id(output) in claimed:
                return
            gate = gate_kind(output, batch)
            if gate is not None:
                claimed[id(output)] = output
                found[name] = (*gate, type(module).__name__)

        return record

    handles = [
        module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name
    ]
    try:
        with MODEL_CALLS.running(), torch.inference_mode():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(
        GateSpec(name, kind, shape, module)
        for name, (kind, shape, module) in found.items()
        if calls[name] == 1
    )
