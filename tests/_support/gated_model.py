"""A small classifier whose forward pass waits on a gate, for deterministic queueing tests.

Served through the `SOURCE` factory source. While `GATE` is cleared, a batch that reaches the
engine blocks there, so tests can fill the queue, let deadlines pass or cancel calls while
nothing else moves. The gate is open by default so the server's warm-up passes.

The gate and `ENTERED` are files in one directory (`CAMSERVE_TEST_GATE_DIR`, chosen when the
test process first imports this module), with threading.Event's methods: the model may run in
the test's process or in an engine process the test's server spawned, which inherits the
variable and so sees the same gate.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SOURCE = "factory:tests._support.gated_model:gated_net"
GATE_TIMEOUT_S = 60.0
_POLL_S = 0.002


class FileEvent:
    """threading.Event's set/clear/is_set/wait, kept as a file so processes share it."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def set(self) -> None:
        self._path.touch()

    def clear(self) -> None:
        self._path.unlink(missing_ok=True)

    def is_set(self) -> bool:
        return self._path.exists()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True


def _gate_dir() -> Path:
    directory = os.environ.get("CAMSERVE_TEST_GATE_DIR")
    if not directory:
        directory = os.environ["CAMSERVE_TEST_GATE_DIR"] = tempfile.mkdtemp(prefix="gate-")
    return Path(directory)


GATE = FileEvent(_gate_dir() / "open")
ENTERED = FileEvent(_gate_dir() / "entered")  # set whenever a forward pass starts
if not os.environ.get("CAMSERVE_TEST_GATE_CHILD"):
    os.environ["CAMSERVE_TEST_GATE_CHILD"] = "1"  # processes started from here share the gate
    GATE.set()


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
