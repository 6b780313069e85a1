"""A small classifier whose forward pass waits on a gate, for deterministic queueing tests.

Served through the `SOURCE` factory source. While `GATE` is cleared, a batch that reaches the
engine blocks there, so tests can fill the queue, let deadlines pass or cancel calls while
nothing else moves. The gate is open by default so the server's warm-up passes.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

SOURCE = "factory:tests._support.gated_model:gated_net"
GATE = threading.Event()
GATE.set()
ENTERED = threading.Event()  # set whenever a forward pass starts
GATE_TIMEOUT_S = 60.0


class GatedNet(nn.Module):
    """conv -> relu -> conv -> relu -> global pool -> linear, behind `GATE`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ENTERED.set()
        if not GATE.wait(GATE_TIMEOUT_S):
            raise TimeoutError("test gate stayed closed")
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def gated_net() -> nn.Module:
    return GatedNet()
