"""Wall-clock timing of one call, synchronised on CUDA so queued kernels are counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes on `device`, its queued GPU work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
