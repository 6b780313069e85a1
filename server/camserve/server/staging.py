"""Builds a batch's model input on the engine's device from the images' prepared pixels.

Images arrive as uint8 pixels (decoded photos, uint8 tensors) or as float32 inputs the caller
already normalised. uint8 pixels travel to the device as uint8, a quarter of the bytes of the
float input, and are normalised there for the whole batch at once. On CUDA they go through a
page-locked (pinned) staging buffer, so the copy is asynchronous DMA that overlaps whatever the
device is still doing; the buffer is reused once the previous batch's copy has finished.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camserve.server.preprocess import channel_constants, normalise_with


class InputStager:
    """Turns one batch's (3, H, W) pixels into an (N, 3, H, W) float32 input on `device`.

    One stager serves one model's worker thread, so its buffer is never shared.
    """

    def __init__(
        self, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self._device = device
        # On the device once: building them per batch would be a blocking upload each time.
        self._mean, self._std = channel_constants(mean, std, device)
        self._pinned = device.type == "cuda"
        self._buffer: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def batch(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The normalised float32 batch on the device, rows in the order given."""
        if not pixels:
            raise ValueError("a batch needs at least one image")
        raw = [i for i, p in enumerate(pixels) if p.dtype == torch.uint8]
        if len(raw) == len(pixels):
            return self._normalised(pixels)
        ready = [i for i, p in enumerate(pixels) if p.dtype != torch.uint8]
        inputs = torch.stack([pixels[i] for i in ready]).to(
            self._device, dtype=torch.float32, non_blocking=True
        )
        if not raw:
            return inputs
        out = torch.empty((len(pixels), *inputs.shape[1:]), device=self._device)
        out[ready] = inputs
        out[raw] = self._normalised([pixels[i] for i in raw])
        return out

    def _normalised(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        on_device = self._upload(pixels)
        return normalise_with(on_device, self._mean, self._std)

    def _upload(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The uint8 batch on the device: stacked into the pinned buffer and copied
        asynchronously on CUDA; stacked on the CPU."""
        if not self._pinned or any(p.device != torch.device("cpu") for p in pixels):
            return torch.stack([p.to(self._device) for p in pixels])
        shape = (len(pixels), *pixels[0].shape)
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self._buffer, self._copied = buffer, None
        elif self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy still reads the buffer
        staged = buffer[: shape[0]]
        torch.stack(list(pixels), out=staged)
        on_device = staged.to(self._device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device
