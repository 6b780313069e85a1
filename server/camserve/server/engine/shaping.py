"""Maps from feature resolution to pixels, and to [0, 1]. Pure torch, no model.

The engine returns raw maps at the target layer's resolution. `shape_heatmaps` is the one entry
point the response code uses: it brings them to the requested resolution and dtype under one
normalisation rule, the same at every resolution:

- `feature`: the maps as the layer produced them, min-max normalised over the feature map.
- `input`: upsampled to the model input (the crop) and normalised over it. These are exactly
  pytorch-grad-cam's values (see below).
- `original` / `explicit`: the `input` values, already normalised, mapped onto the original
  image (at its own size or at an explicit size) with zeros outside the crop. Inside the crop they
  are the `input` values resampled; nothing is normalised again over the larger canvas, so the
  same image gives the same values whatever the resolution asked for. Overlays use these values.

Resampling is bilinear with half-pixel centres (`align_corners=False`), as cv2.resize does, so
`normalise(to_input(raw))` equals pytorch-grad-cam's output, which normalises, resizes and
normalises again: min-max scaling is affine and bilinear resizing commutes with affine maps, so
the first normalisation changes nothing. (Normalising only before resizing would not do: resized
maps need not reach the original extremes.) The one difference is pytorch-grad-cam's 1e-7
epsilon in the divisor, which shifts its output visibly only for maps whose raw maximum is below
about 1e-3; `normalise` is exactly scale-invariant.

Mapping onto the original never builds the resized image as a canvas (an 8x4000 image resized
to a shorter side of 256 would make it 256x128000 floats per map): only the crop's footprint in
the output is computed, band by band, straight into the output dtype. `output_bytes` bounds what
shaping and encoding allocate, so a request can be refused before any compute.

The tensor functions take (K, h, w) maps (or a single (h, w) map) and return the same rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from camserve.server.engine.types import EngineError

# A map whose range is below this fraction of its magnitude is constant up to float32 rounding.
_CONSTANT_RTOL = 1e-6
RESOLUTIONS = ("feature", "input", "original", "explicit")
DTYPE_BYTES = {"float32": 4, "float16": 2, "uint8": 1}
# Mapping onto the original works on groups of maps and bands of output rows of about this many
# float32 values at a time.
_BAND_ELEMENTS = 1 << 20
# Upsampling to the model input and normalising hold a few arrays of the input's size per map.
_INPUT_BUFFERS = 4
# Rendering an overlay holds, per original pixel: the uint8 map, its float32 copy in the
# renderer, colour indices, the coloured RGB image, the blended RGB image and the PNG buffer.
_OVERLAY_BYTES_PER_PIXEL = 1 + 4 + 1 + 3 + 3 + 4


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

    @property
    def input_hw(self) -> tuple[int, int]:
        """The model input's size: the crop's."""
        return self.crop_box[2], self.crop_box[3]


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
    """(K, h, w) -> (K, H, W), bilinear, half-pixel centres, float32.

    On the CPU as two small matrix products, rows then columns, over the interpolation weights
    of each axis (two taps per output pixel, the rest zeros): the same taps as F.interpolate,
    equal to it up to float32 rounding (about 1e-7), and 4-5 times faster for a 14x14 map
    brought to 224x224 (38 against 140-200 us), where torch's bilinear kernel loops per pixel.
    """
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size_hw):
        return maps
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size_hw))
    if maps.device.type != "cpu":
        resized = F.interpolate(maps[:, None], size=size_hw, mode="bilinear", align_corners=False)
        return resized[:, 0]
    rows = _interpolation_matrix(size_hw[0], int(maps.shape[-2]))
    cols = _interpolation_matrix(size_hw[1], int(maps.shape[-1]))
    return torch.matmul(torch.matmul(rows, maps), cols.T)


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(out_len: int, in_len: int) -> torch.Tensor:
    """(out_len, in_len) float32: output pixel i is row i's weights times the input line."""
    index_a, index_b, fraction = _source_taps(out_len, in_len)
    weights = np.zeros((out_len, in_len), dtype=np.float32)
    lines = np.arange(out_len)
    np.add.at(weights, (lines, index_a), np.float32(1) - fraction)
    np.add.at(weights, (lines, index_b), fraction)
    return torch.from_numpy(weights)


def to_input(maps: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Upsamples feature-resolution maps to the model input size."""
    _check_size("input_hw", input_hw)
    batch, single = _as_batch(maps)
    out = _resize(batch, input_hw)
    return out[0] if single else out


@dataclass(frozen=True)
class _Taps:
    """One axis of a bilinear resize from the resized image onto the output, restricted to the
    output pixels that read the crop. Indices point into the crop padded with one zero line in
    front (index 0 is zero, crop line c is c + 1): output pixel `first + i` is
    `crop[a[i]] + fraction[i] * (crop[b[i]] - crop[a[i]])`."""

    first: int
    a: np.ndarray  # int64
    b: np.ndarray  # int64
    fraction: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.a)


def _source_taps(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `out_len` output pixels, the two input pixels F.interpolate(bilinear,
    align_corners=False) reads and the second one's weight, computed in float32 as PyTorch's
    CPU kernel does."""
    index = np.arange(out_len)
    if out_len == in_len:  # PyTorch copies: no arithmetic, no rounding
        return index, index, np.zeros(out_len, dtype=np.float32)
    scale = np.float32(in_len) / np.float32(out_len)
    half = np.float32(0.5)
    source = np.maximum(scale * (index.astype(np.float32) + half) - half, np.float32(0))
    index_a = np.minimum(np.floor(source).astype(np.int64), in_len - 1)
    fraction = np.clip(source - index_a.astype(np.float32), 0, 1).astype(np.float32)
    index_b = np.where(index_a < in_len - 1, index_a + 1, index_a)
    return index_a, index_b, fraction


def _taps(out_len: int, resized_len: int, crop_start: int, crop_len: int) -> _Taps | None:
    """The taps of F.interpolate(bilinear, align_corners=False) from `resized_len` to `out_len`
    pixels, computed in float32 as PyTorch's CPU kernel does, for a resized image that is zero
    outside [crop_start, crop_start + crop_len)."""
    index_a, index_b, fraction = _source_taps(out_len, resized_len)
    # The crop clipped to the resized image: a padded crop's outside part is not drawn.
    low, high = max(crop_start, 0), min(crop_start + crop_len, resized_len)
    inside_a = (index_a >= low) & (index_a < high)
    inside_b = (index_b >= low) & (index_b < high)
    touched = np.flatnonzero(inside_a | inside_b)
    if touched.size == 0:
        return None
    span = slice(int(touched[0]), int(touched[-1]) + 1)
    return _Taps(
        first=span.start,
        a=np.where(inside_a[span], index_a[span] - crop_start + 1, 0),
        b=np.where(inside_b[span], index_b[span] - crop_start + 1, 0),
        fraction=fraction[span],
    )


def _cast(maps: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 maps in the output dtype; uint8 is round(255 * value), clipped to 0..255."""
    if dtype == "float32":
        return maps
    if dtype == "float16":
        return maps.to(torch.float16)
    return maps.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise EngineError(f"dtype={dtype!r}: use one of {list(DTYPE_BYTES)}")


def _onto(
    maps: torch.Tensor, geometry: Geometry, size_hw: tuple[int, int], dtype: str
) -> np.ndarray:
    """(K, crop h, crop w) maps drawn over the original image at `size_hw`, zero outside the crop,
    in `dtype`. Equals pasting them into a zero canvas of the resized image's size and resizing
    that canvas to `size_hw`, without building the canvas: the columns are resampled first, on
    the crop's rows only, then each band of output rows is gathered from the two crop rows it
    reads and written straight into the output."""
    count = maps.shape[0]
    out = np.zeros((count, *size_hw), dtype=np.dtype(dtype))
    top, left, height, width = geometry.crop_box
    rows = _taps(size_hw[0], geometry.resized_hw[0], top, height)
    cols = _taps(size_hw[1], geometry.resized_hw[1], left, width)
    if rows is None or cols is None or count == 0:
        return out
    target = torch.from_numpy(out)[:, rows.first : rows.first + len(rows)]
    target = target[:, :, cols.first : cols.first + len(cols)]
    padded = F.pad(maps.float(), (1, 0, 1, 0))  # the zero line at index 0 of both axes
    col_a, col_b = torch.from_numpy(cols.a), torch.from_numpy(cols.b)
    col_fraction = torch.from_numpy(cols.fraction)
    row_fraction = torch.from_numpy(rows.fraction)[None, :, None]
    row_a, row_b = torch.from_numpy(rows.a), torch.from_numpy(rows.b)
    group = max(1, _BAND_ELEMENTS // ((height + 1) * len(cols)))
    for first in range(0, count, group):
        chunk = padded[first : first + group]
        left_of = chunk.index_select(2, col_a)
        by_column = torch.lerp(left_of, chunk.index_select(2, col_b), col_fraction)
        band = max(1, _BAND_ELEMENTS // (chunk.shape[0] * len(cols)))
        for start in range(0, len(rows), band):
            stop = min(start + band, len(rows))
            above = by_column.index_select(1, row_a[start:stop])
            below = by_column.index_select(1, row_b[start:stop])
            values = torch.addcmul(above, row_fraction[:, start:stop], below.sub_(above))
            target[first : first + group, start:stop] = _cast(values, dtype)
    return out


def to_size(maps: torch.Tensor, size_hw: tuple[int, int], geometry: Geometry) -> torch.Tensor:
    """Maps over the whole original image, drawn at `size_hw`; zero outside the crop; float32.

    The maps may be at any resolution: they are first brought to the crop size, then placed over
    the original image where the crop came from, as if pasted into the resized image at the crop
    box and that image scaled to `size_hw`.
    """
    _check_size("size_hw", size_hw)
    batch, single = _as_batch(maps)
    cropped = _resize(batch, geometry.input_hw)
    out = torch.from_numpy(_onto(cropped, geometry, size_hw, "float32"))
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
    # amin and amax, not aminmax: torch's CPU aminmax over a dimension ran 15 times slower
    # (186 against 13 us for one 224x224 map), and the values are the same.
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    span = high - low
    constant = span <= torch.maximum(high.abs(), low.abs()) * _CONSTANT_RTOL
    any_constant = bool(constant.any())  # rare: skip a pass over every map when none is
    if any_constant:
        span = torch.where(constant, torch.ones_like(span), span)
    out = batch.sub(low[:, None, None]).div_(span[:, None, None])
    if any_constant:
        out.masked_fill_(constant[:, None, None], 0.0)
    return out[0] if single else out


def output_hw(
    geometry: Geometry,
    resolution: str,
    size: tuple[int, int] | None,
    feature_hw: tuple[int, int],
) -> tuple[int, int]:
    """The (height, width) of each heatmap at `resolution`."""
    if resolution == "feature":
        return feature_hw
    if resolution == "input":
        return geometry.input_hw
    if resolution == "original":
        return geometry.original_hw
    if resolution == "explicit":
        if size is None:
            raise EngineError("resolution 'explicit' needs size=(height, width)")
        _check_size("size", size)
        return size
    raise EngineError(f"resolution={resolution!r}: use one of {list(RESOLUTIONS)}")


def shape_heatmaps(
    raw: torch.Tensor,
    geometry: Geometry,
    resolution: str,
    size: tuple[int, int] | None = None,
    *,
    normalised: bool = True,
    dtype: str = "float32",
) -> np.ndarray:
    """(K, h, w) raw feature maps as (K, H, W) heatmaps of `dtype` at `resolution`.

    `resolution` is "feature", "input", "original" or "explicit" (with `size` = (height,
    width)); `dtype` is "float32", "float16" or "uint8" (normalised maps only, as
    round(255 * value)). With `normalised`, maps follow the module's one rule: normalised over
    the feature map at "feature", over the model input everywhere else, then mapped. Without it
    they keep the engine's raw scale, upsampled and mapped the same way.
    """
    batch, _ = _as_batch(raw)
    _check_dtype(dtype)
    if dtype == "uint8" and not normalised:
        raise EngineError("dtype 'uint8' holds normalised maps only; use float32 or float16")
    out_hw = output_hw(geometry, resolution, size, (int(batch.shape[-2]), int(batch.shape[-1])))
    if resolution == "feature":
        maps = normalise(batch) if normalised else batch.float()
        return _cast(maps.contiguous(), dtype).numpy()
    maps = to_input(batch, geometry.input_hw)
    if normalised:
        maps = normalise(maps)
    if resolution == "input":
        return _cast(maps.contiguous(), dtype).numpy()
    return _onto(maps, geometry, out_hw, dtype)


def output_bytes(
    geometry: Geometry,
    resolution: str,
    size: tuple[int, int] | None,
    dtype: str,
    maps: int,
    feature_hw: tuple[int, int],
    *,
    overlay: bool = False,
) -> int:
    """An upper bound on the bytes that shaping and encoding one image's `maps` heatmaps
    allocate, to refuse a request before any compute rather than run out of memory after it.

    It counts the heatmaps in their output dtype twice (the arrays and their wire copies in the
    response message), the raw maps and normalising them, the maps at input resolution
    (upsampled and normalised), the groups and row bands in flight while mapping onto the
    original or an explicit size over the crop's footprint, and, with `overlay`, rendering the
    overlay at the original size; never the resized image. gRPC's serialised copy of the whole
    response is not counted: the message size limit bounds it.
    """
    _check_dtype(dtype)
    if maps < 0:
        raise EngineError(f"maps must be >= 0, got {maps}")
    height, width = output_hw(geometry, resolution, size, feature_hw)
    crop_h, crop_w = geometry.input_hw
    total = 2 * maps * height * width * DTYPE_BYTES[dtype]
    total += (1 + _INPUT_BUFFERS) * maps * feature_hw[0] * feature_hw[1] * 4  # and normalising
    if resolution != "feature":
        total += _INPUT_BUFFERS * maps * crop_h * crop_w * 4
    if resolution in ("original", "explicit"):
        total += _mapping_bytes(maps, geometry, (height, width))
    if overlay:
        original_h, original_w = geometry.original_hw
        total += _INPUT_BUFFERS * crop_h * crop_w * 4
        total += _mapping_bytes(1, geometry, geometry.original_hw)
        total += original_h * original_w * _OVERLAY_BYTES_PER_PIXEL
    return total


def _mapping_bytes(maps: int, geometry: Geometry, out_hw: tuple[int, int]) -> int:
    """The most `_onto` holds besides its output: the zero-padded maps, three arrays of a group
    of maps resampled along the columns, and three arrays of a band of output rows, all over the
    crop's footprint in the output."""
    top, left, crop_h, crop_w = geometry.crop_box
    row_taps = _taps(out_hw[0], geometry.resized_hw[0], top, crop_h)
    col_taps = _taps(out_hw[1], geometry.resized_hw[1], left, crop_w)
    rows = len(row_taps) if row_taps is not None else 0
    cols = len(col_taps) if col_taps is not None else 0
    padded = maps * (crop_h + 1) * (crop_w + 1)
    by_column = min(maps * (crop_h + 1) * cols, max(_BAND_ELEMENTS, (crop_h + 1) * cols))
    run = min(maps * rows * cols, max(_BAND_ELEMENTS, maps * cols))
    return 4 * (padded + 3 * by_column + 3 * run)
