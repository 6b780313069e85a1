"""Drawing heatmaps with numpy and Pillow only: colormaps, colouring and overlays.

Shared by the server (overlay PNGs in responses) and the client SDK (overlays and panels), so
both draw the same picture. Colormaps are 256-entry lookup tables computed here: jet from its
piecewise-linear definition; viridis, inferno and turbo by linear interpolation between 17
evenly spaced anchor colours taken from the published maps (within 7/255 of the originals);
gray from black to white, for pixel attributions drawn as grayscale.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image as PILImage

_ANCHORS = {
    "viridis": "440154 48186a 472d7b 424086 3b528b 33638d 2c728e 26828e 21918c 1fa088 28ae80 "
    "3fbc73 5ec962 84d44b addc30 d8e219 fde725",
    "inferno": "000004 0b0724 210c4a 3d0965 57106e 71196e 8a226a a32c61 bc3754 d24644 e45a31 "
    "f1731d f98e09 fcac11 f9cb35 f2ea69 fcffa4",
    "turbo": "30123b 4040a2 466be3 4294ff 28bceb 18ddc2 32f298 6dfe62 a4fc3c cdec34 eecf3a "
    "fdac34 fb7e21 eb500e d02f05 a91601 7a0403",
}
COLORMAPS = ("jet", "viridis", "inferno", "turbo", "gray")


@functools.cache
def colormap(name: str = "jet") -> np.ndarray:
    """The (256, 3) uint8 lookup table of colormap `name` (read-only)."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "gray":  # black to white: the usual picture of a saliency map
        table = np.stack([x, x, x], axis=1)
    elif name == "jet":
        # Each channel is a trapezoid: a quarter up, a quarter or more flat, a quarter down.
        table = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=1)
    elif name in _ANCHORS:
        anchors = np.array([list(bytes.fromhex(h)) for h in _ANCHORS[name].split()]) / 255
        stops = np.linspace(0.0, 1.0, len(anchors))
        table = np.stack([np.interp(x, stops, anchors[:, c]) for c in range(3)], axis=1)
    else:
        raise ValueError(f"colormap={name!r}: use one of {list(COLORMAPS)}")
    lut = np.round(table * 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """A 2-D map scaled to [0, 1] float32: uint8 maps by 255, float maps by their min and max."""
    array = np.asarray(heatmap)
    if array.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D (HxW); got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    array = np.nan_to_num(array.astype(np.float32))
    if not array.size:
        return array
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def colorize(
    heatmap: np.ndarray, colormap_name: str = "jet", size: tuple[int, int] | None = None
) -> PILImage.Image:
    """The heatmap as an RGB image, resized bilinearly to `size` (width, height) when given."""
    array = np.asarray(heatmap)
    if array.dtype == np.uint8 and array.ndim == 2 and size in (None, array.shape[::-1]):
        indices = array  # already the 0..255 indices that normalising and rounding would give
    else:
        values = normalise(heatmap)
        if size is not None and size != (values.shape[1], values.shape[0]):
            resized = PILImage.fromarray(values).resize(size, PILImage.Resampling.BILINEAR)
            values = np.asarray(resized)
        indices = np.clip(np.round(values * 255), 0, 255).astype(np.uint8)
    return PILImage.fromarray(colormap(colormap_name)[indices])


def blend(
    picture: PILImage.Image, heatmap: np.ndarray, colormap: str = "jet", alpha: float = 0.4
) -> PILImage.Image:
    """The RGB `picture` with the coloured heatmap blended over it, at the picture's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1]; got {alpha}")
    picture = picture if picture.mode == "RGB" else picture.convert("RGB")
    return PILImage.blend(picture, colorize(heatmap, colormap, size=picture.size), alpha)
