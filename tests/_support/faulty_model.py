"""A small classifier that fails on command, for the fault campaign.

Served through the `SOURCE` factory source, with `RECIPE` settings (32x32 input, mean/std 0.5,
so a white pixel reaches the model as exactly 1.0). `FAULT` decides what a forward pass does:

- `mode = "marked"`: raise `error()` when the batch holds a marked image (first row all white);
- `mode = "always"`: raise on every pass (a model-wide, persistent fault);
- `mode = "nan-marked"`: return NaN logits for the marked images only (rows stay independent);
- `mode = "nan"`: return NaN logits for every image;
- `mode = "off"`: compute normally.

It also records whether the input of the last failed pass was still alive when the next pass
began (`FAULT.failed_input_alive`), to prove a retry never runs beside the failed batch.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

SOURCE = "factory:tests._support.faulty_model:faulty_net"
RECIPE = {"resize": 0, "crop": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@dataclass
class Fault:
    mode: str = "off"
    error: Callable[[], BaseException] = lambda: RuntimeError("injected engine fault")
    failed_input: weakref.ref[torch.Tensor] | None = None
    failed_input_alive: list[bool] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, mode: str = "off", error: Callable[[], BaseException] | None = None) -> None:
        with self.lock:
            self.mode = mode
            self.error = error or (lambda: RuntimeError("injected engine fault"))
            self.failed_input = None
            self.failed_input_alive.clear()


FAULT = Fault()


def marked(image: np.ndarray) -> np.ndarray:
    """A copy of a uint8 HxWx3 image with the marker (first row white) drawn in."""
    copy = image.copy()
    copy[0, :, :] = 255
    return copy


class FaultyNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with FAULT.lock:
            if FAULT.failed_input is not None:
                FAULT.failed_input_alive.append(FAULT.failed_input() is not None)
                FAULT.failed_input = None
            has_marked = bool((x[:, :, 0, :].flatten(1).amin(dim=1) > 0.99).any())
            if FAULT.mode == "always" or (FAULT.mode == "marked" and has_marked):
                FAULT.failed_input = weakref.ref(x)
                raise FAULT.error()
        logits = self.fc(torch.flatten(self.pool(self.features(x)), 1))
        if FAULT.mode == "nan":
            return logits + float("nan")
        if FAULT.mode == "nan-marked":
            rows = x[:, :, 0, :].flatten(1).amin(dim=1) > 0.99
            return torch.where(rows[:, None], torch.full_like(logits, float("nan")), logits)
        return logits


def faulty_net() -> nn.Module:
    return FaultyNet()
