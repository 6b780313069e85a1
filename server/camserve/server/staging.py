"""Builds a batch's model input on the engine's device from the images' prepared pixels.

Images arrive as uint8 pixels (decoded photos, uint8 tensors) or as float32 inputs the caller
already normalised. uint8 pixels travel to the device as uint8, a quarter of the bytes of the
float input, and are normalised there for the whole batch at once. On CUDA they go through a
page-locked (pinned) staging buffer, so the copy is asynchronous DMA that overlaps whatever the
device is still doing; the buffer is reused once the previous batch's copy has finished.

Layout: decoded pixels are (3, H, W) views of the decoder's (H, W, 3) memory. The batch is
built as (N, H, W, 3) and normalised over rows of W * 3 values against the constants repeated W
times (innermost loops as long as a row, with exactly the per-value arithmetic of the (3, H, W)
formula). The result, seen as (N, 3, H, W), is channels_last: the layout the CPU engine runs, so
it needs no conversion there. Stacking contiguous (3, H, W) pixels into a channels_last float
batch instead cost about five times as much on the CPU (a transposing copy of the float batch,
and normalisation loops 3 values long).

On the CPU each image is copied once, straight into its row of the float batch: uint8 pixels
are converted by that copy, and float inputs in (3, H, W) memory are transposed by it (the
server's frontends prepare float inputs for a CPU engine in (H, W, 3) memory already, so
theirs is a plain copy). Stacking them first and converting or transposing the stack
afterwards touched every value twice, into freshly allocated memory each time (for 32 float
inputs of 224 x 224, the stack and the engine's channels_last conversion were three quarters
of the tiny model's explain time).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class InputStager:
    """Turns one batch's (3, H, W) pixels into an (N, 3, H, W) float32 input on `device`.

    One stager serves one model's worker thread, so its buffer is never shared.
    """

    def __init__(
        self, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self._device = device
        # On the device once: building them per batch would be a blocking upload each time.
        self._mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self._std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffer: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def batch(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The normalised float32 batch on the device, rows in the order given."""
        if not pixels:
            raise ValueError("a batch needs at least one image")
        if self._device.type == "cpu":
            return self._on_cpu(pixels)
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

    def _on_cpu(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The batch built in place, one copy per image (module docstring)."""
        h, w = pixels[0].shape[-2:]
        by_pixel = torch.empty((len(pixels), h, w, 3), dtype=torch.float32)
        raw = []
        for index, item in enumerate(pixels):
            by_pixel[index].copy_(item.permute(1, 2, 0))
            if item.dtype == torch.uint8:
                raw.append(index)
        rows = by_pixel.view(len(pixels), h, w * 3)
        if len(raw) == len(pixels):
            self._normalise_rows(rows)
        else:
            for index in raw:
                self._normalise_rows(rows[index])
        return by_pixel.permute(0, 3, 1, 2)

    def _normalised(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N, 3, H, W) float32 on the device, channels_last (module docstring)."""
        by_pixel = self._upload(pixels)
        n, h, w, c = by_pixel.shape
        rows = self._normalise_rows(by_pixel.view(n, h, w * c).float())
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)

    def _normalise_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float rows of W * 3 pixel values (0-255) normalised in place, against the per-channel
        constants repeated W times: the (3, H, W) formula's arithmetic, value for value."""
        width = rows.shape[-1] // 3
        if width not in self._rows:
            self._rows[width] = (self._mean.repeat(width), self._std.repeat(width))
        mean, std = self._rows[width]
        return rows.div_(255).sub_(mean).div_(std)

    def _upload(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The uint8 batch as (N, H, W, 3) on the CUDA device: stacked into the pinned buffer
        and copied asynchronously; pixels already on the device (decoded there) are stacked
        there."""
        by_pixel = [p.permute(1, 2, 0) for p in pixels]  # a plain view of decoded pixels
        if any(p.device != torch.device("cpu") for p in pixels):
            return torch.stack([p.to(self._device) for p in by_pixel])
        shape = (len(pixels), *by_pixel[0].shape)
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self._buffer, self._copied = buffer, None
        elif self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy still reads the buffer
        staged = buffer[: shape[0]]
        torch.stack(by_pixel, out=staged)
        on_device = staged.to(self._device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device
