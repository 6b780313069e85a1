"""Where and how an engine's model runs: device, precision and memory format, decided once.

Precision: "bfloat16" (CPU or CUDA) and "float16" (CUDA) cast the model's floating parameters and
buffers once, at construction, and the inputs on the way in; no autocast, which would cast the
weights again on every forward pass. float16 gradients are kept out of underflow by scaling the
grad outputs by a power of two (`GRAD_SCALES`), divided out again in float32.

Memory format: with `channels_last=None` (the default) the engine uses channels_last tensors on
the CPU, where oneDNN convolutions run measurably faster in that layout (README, Performance;
compare `benchmarks/engine.py --memory-format contiguous`), and in reduced precision; contiguous
tensors for CUDA float32. Whether the model can take channels_last is decided once, by its
first call (the probe pass at load): a model that fails on channels_last input but works on
contiguous input runs contiguous from then on. Later failures are the model's own and never
change the format; running out of memory never counts as a model that cannot take the format.
Pass True or False to decide explicitly.

cuDNN's autotuner (`torch.backends.cudnn.benchmark`) is left as the process has it, off by
default: it times every algorithm again for each new input shape, and a dynamic batcher makes a
new batch size, hence a new shape for every convolution, forward and backward, at any moment.
Serving a ResNet-50 at batch 64 on an H200 with it on, the engine's thread spent 73% of its time
inside convolution calls (py-spy) and the server answered 256 images/s against 3,041 offline;
with it off, the tiny-model serving ceiling there went from 327 to 928 images/s. cuDNN's
heuristics pick an algorithm without running anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from camserve.server.engine.types import EngineError

T = TypeVar("T")

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# The one-hot grad outputs' value per precision, divided out of the float32 gradients again (a
# power of two, so exactly). float16 gradients below 6e-5 lose precision and below 6e-8 vanish;
# those of a logit with respect to a late layer are typically 1e-6 to 1e-2, and 2**12 lifts them
# into float16's normal range while leaving room up to 16 before overflow. bfloat16 has float32's
# exponent range and needs no scale.
GRAD_SCALES: dict[str, float] = {"float32": 1.0, "bfloat16": 1.0, "float16": 2.0**12}


def parse_device(device: torch.device | str) -> torch.device:
    """`device` as a torch device camserve can run on, or an EngineError saying which to use."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(
            f"device {device!r} is not a torch device; use 'cpu' or 'cuda:0'"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked for CUDA but none is available; use 'cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return parsed


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of `precision` on `device`, or an EngineError naming the ones that work."""
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
    if precision == "float16" and device.type != "cuda":
        raise EngineError(
            "precision 'float16' needs a CUDA device (the CPU has few float16 kernels); use "
            "'bfloat16' or 'float32' on the CPU"
        )
    return PRECISIONS[precision]


class Placement:
    """A model's device, precision and memory format, and its inputs moved to them."""

    def __init__(
        self, device: torch.device | str, precision: str, channels_last: bool | None
    ) -> None:
        self.device = parse_device(device)
        self.precision = precision
        self.dtype = check_precision(precision, self.device)
        self.grad_scale = GRAD_SCALES[precision]
        # Measured faster on the CPU (benchmarks/engine.py) and what tensor cores prefer in
        # reduced precision; tried once for models that cannot take channels_last.
        self._undecided = channels_last is None
        if channels_last is None:
            channels_last = self.device.type == "cpu" or precision != "float32"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def place(self, model: nn.Module) -> nn.Module:
        """`model` in eval mode, frozen, on the device, in the precision and memory format."""
        model.eval()
        model.requires_grad_(False)
        model.to(self.device)
        if self.dtype != torch.float32:
            model.to(self.dtype)  # floating parameters and buffers, once: no autocast per call
        self._model = model.to(memory_format=self.memory_format)
        return self._model

    def run(self, forward: Callable[[torch.Tensor], T], images: torch.Tensor) -> T:
        """`forward` on the images moved to the device and memory format.

        The model's first call settles a default channels_last (module docstring); after it a
        failure is raised as it is.
        """
        if not self._undecided:
            return forward(self.to_device(images))
        try:
            result = forward(self.to_device(images))
        except torch.OutOfMemoryError:
            raise  # says nothing about the format: still undecided
        except RuntimeError:
            if self.memory_format != torch.channels_last:
                raise
        else:
            self._undecided = False
            return result
        self._set_memory_format(torch.contiguous_format)
        try:
            result = forward(self.to_device(images))
        except Exception:
            self._set_memory_format(torch.channels_last)
            raise
        self._undecided = False
        return result

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        self.memory_format = memory_format
        self._model.to(memory_format=memory_format)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Model inputs on the device, in the engine's precision and memory format."""
        x = images.detach().to(self.device, dtype=self.dtype, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)

    def to_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """A 4-D tensor on the device in the engine's memory format; floating tensors in the
        engine's precision, which the model's weights are in."""
        dtype = self.dtype if tensor.is_floating_point() else None
        x = tensor.detach().to(self.device, dtype=dtype, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)
