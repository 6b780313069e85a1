"""Maps from feature resolution to pixels, and to [0, 1]. Pure torch, no model.

The engine returns raw maps at the target layer's resolution; this module brings them to the
model input (`to_input`), back onto the original image by undoing the centre crop and the resize
(`to_original`, `to_size`), and normalises them (`normalise`). Resampling is bilinear with
half-pixel centres (`align_corners=False`), as cv2.resize does, so `normalise(to_input(raw))`
equals pytorch-grad-cam's output, which normalises, resizes and normalises again: min-max
scaling is affine and bilinear resizing commutes with affine maps, so the first normalisation
changes nothing. (Normalising only before resizing would not do: resized maps need not reach
the original extremes.) The one difference is pytorch-grad-cam's 1e-7 epsilon in the divisor,
which shifts its output visibly only for maps whose raw maximum is below about 1e-3; `normalise`
is exactly scale-invariant.

Every function takes (K, h, w) maps (or a single (h, w) map) and returns the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from camserve.server.engine.types import EngineError

# A map whose range is below this fraction of its magnitude is constant up to float32 rounding.
_CONSTANT_RTOL = 1e-6


@dataclass(frozen=True)
class Geometry:
    """How a model input was made from an original image: resize, then crop.

    `crop_box` is (top, left, height, width) inside the resized image; the crop is the model
    input. A box reaching outside the resized image (a crop larger than the image, padded) is
    allowed.
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        for field, size in (("original_hw", self.original_hw), ("resized_hw", self.resized_hw)):
            if len(size) != 2 or min(size) < 1:
                raise EngineError(f"Geometry.{field} must be two positive sizes, got {size}")
        if len(self.crop_box) != 4 or min(self.crop_box[2:]) < 1:
            raise EngineError(
                f"Geometry.crop_box must be (top, left, height, width) with positive height and "
                f"width, got {self.crop_box}"
            )


def _as_batch(maps: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if maps.dim() == 2:
        return maps[None], True
    if maps.dim() == 3:
        return maps, False
    raise EngineError(f"maps must be (K, h, w) or (h, w), got shape {tuple(maps.shape)}")


def _check_size(name: str, size_hw: tuple[int, int]) -> None:
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise EngineError(f"{name} must be (height, width) with both >= 1, got {size_hw}")


def _resize(maps: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear, half-pixel centres, float32."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size_hw):
        return maps
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size_hw))
    resized = F.interpolate(maps[:, None], size=size_hw, mode="bilinear", align_corners=False)
    return resized[:, 0]


def to_input(maps: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Upsamples feature-resolution maps to the model input size."""
    _check_size("input_hw", input_hw)
    batch, single = _as_batch(maps)
    out = _resize(batch, input_hw)
    return out[0] if single else out


def to_size(maps: torch.Tensor, size_hw: tuple[int, int], geometry: Geometry) -> torch.Tensor:
    """Maps over the whole original image, drawn at `size_hw`; zero outside the crop.

    The maps may be at any resolution: they are first brought to the crop size, placed into the
    resized image at the crop box, and the resized image is then scaled to `size_hw`.
    """
    _check_size("size_hw", size_hw)
    batch, single = _as_batch(maps)
    top, left, height, width = geometry.crop_box
    cropped = _resize(batch, (height, width))
    rows, cols = geometry.resized_hw
    canvas = cropped.new_zeros((cropped.shape[0], rows, cols))
    # Intersect the crop box with the resized image (a padded crop reaches outside it).
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, cols)
    if y1 > y0 and x1 > x0:
        canvas[:, y0:y1, x0:x1] = cropped[:, y0 - top : y1 - top, x0 - left : x1 - left]
    out = _resize(canvas, size_hw)
    return out[0] if single else out


def to_original(maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Maps over the original image at its own size: the crop and the resize undone."""
    return to_size(maps, geometry.original_hw, geometry)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling to [0, 1]; a constant map becomes zeros, never NaN."""
    batch, single = _as_batch(maps)
    batch = batch.float()
    flat = batch.flatten(1)
    if flat.shape[1] == 0:
        return maps.float()
    low = flat.amin(dim=1)
    high = flat.amax(dim=1)
    span = high - low
    scale = torch.maximum(high.abs(), low.abs())
    constant = span <= scale * _CONSTANT_RTOL
    span = torch.where(constant, torch.ones_like(span), span)
    out = (batch - low[:, None, None]) / span[:, None, None]
    out = torch.where(constant[:, None, None], torch.zeros_like(out), out)
    return out[0] if single else out
