"""A model's convolution layers and their weights, read without any pass through the model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from camserve.server.records import ConvLayer


def conv_layers(model: nn.Module) -> tuple[ConvLayer, ...]:
    """Every Conv2d of `model` (subclasses such as timm's padded convolutions too), in module
    order, with its weight's shape (out, in / groups, kh, kw)."""
    return tuple(
        ConvLayer(name, tuple(int(d) for d in module.weight.shape), int(module.groups))
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Conv2d)
    )


def conv_weights(model: nn.Module, layer: str) -> np.ndarray:
    """The float32 weights of the Conv2d `layer`, in C order on the host, whatever the model's
    device, precision or memory format. Reads the parameter only: safe beside a running pass."""
    module = model.get_submodule(layer)
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{layer!r} is a {type(module).__name__}, not a Conv2d")
    with torch.no_grad():
        weight = module.weight.detach().to(device="cpu", dtype=torch.float32)
        return weight.contiguous().numpy().copy()
