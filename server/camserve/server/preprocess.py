"""Turns request images into model inputs, recording the geometry to map heatmaps back.

Runs on CPU worker threads, outside the event loop and alongside the running batch. Every check
that can refuse an image happens here, before it reaches the batcher, and raises `ImageError`
naming the request field.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as tf
from PIL import Image, UnidentifiedImageError

from camserve.server.engine.shaping import Geometry
from camserve.server.errors import InvalidRequest
from camserve.server.records import InputRecipe

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
MIN_SIDE = 8


class ImageError(InvalidRequest):
    """An image that cannot be used; the message names the field and what to send instead."""


@dataclass(frozen=True)
class PreparedImage:
    """A model input (3, crop, crop) float32 plus what is needed to map its heatmap back."""

    tensor: torch.Tensor
    geometry: Geometry
    original: Image.Image | None  # kept only when an overlay is rendered


def decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decodes JPEG/PNG/WebP bytes to RGB, refusing oversized images before decoding pixels."""
    if not data:
        raise ImageError(f"{field}: empty image bytes; send JPEG, PNG or WebP file contents")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{field}: image is {width}x{height} = {width * height} pixels, over the limit "
                f"of {max_pixels}; downscale it before sending"
            )
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{field}: image declares more pixels than the limit of {max_pixels}; "
            "downscale it before sending"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{field}: not a decodable image; send JPEG, PNG or WebP file contents"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{field}: corrupt or truncated image ({exc})") from None
    return _checked_rgb(image, field)


def _checked_rgb(image: Image.Image, field: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{field}: image is {width}x{height}; both sides must be >= {MIN_SIDE}")
    # Grayscale, palette, RGBA and 16-bit images are all accepted and converted the same way.
    return image if image.mode == "RGB" else image.convert("RGB")


def from_uint8_array(array: np.ndarray, field: str, max_pixels: int) -> Image.Image:
    """An RGB image from a uint8 (H, W, 3) array."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"{field}: uint8 tensors must be HxWx3 RGB, got shape {list(array.shape)}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageError(f"{field}: {array.shape[0]}x{array.shape[1]} is over {max_pixels} pixels")
    return _checked_rgb(Image.fromarray(np.ascontiguousarray(array), mode="RGB"), field)


def prepare(image: Image.Image, recipe: InputRecipe, keep_original: bool) -> PreparedImage:
    """Resizes, centre-crops and normalises `image` as the model was trained to see it."""
    width, height = image.size
    if recipe.resize:
        resized = tf.resize(image, recipe.resize)
    else:
        resized = image.resize((recipe.crop, recipe.crop), Image.Resampling.BILINEAR)
    rw, rh = resized.size
    top = int(round((rh - recipe.crop) / 2.0))
    left = int(round((rw - recipe.crop) / 2.0))
    cropped = resized.crop((left, top, left + recipe.crop, top + recipe.crop))
    tensor = tf.normalize(tf.to_tensor(cropped), list(recipe.mean), list(recipe.std))
    geometry = Geometry(
        original_hw=(height, width),
        resized_hw=(rh, rw),
        crop_box=(top, left, recipe.crop, recipe.crop),
    )
    return PreparedImage(
        tensor=tensor, geometry=geometry, original=image if keep_original else None
    )


def from_normalised_array(
    array: np.ndarray, field: str, recipe: InputRecipe, keep_original: bool
) -> PreparedImage:
    """A float32 (3, H, W) array that the caller already resized and normalised, used as is."""
    size = recipe.crop
    if array.shape != (3, size, size):
        raise ImageError(
            f"{field}: float32 tensors must be already-normalised 3x{size}x{size} for this model, "
            f"got shape {list(array.shape)}; or send uint8 HxWx3 or encoded bytes"
        )
    if not np.isfinite(array).all():
        raise ImageError(f"{field}: tensor holds NaN or Inf values")
    geometry = Geometry(
        original_hw=(size, size), resized_hw=(size, size), crop_box=(0, 0, size, size)
    )
    tensor = torch.from_numpy(array.copy())
    original = None
    if keep_original:  # an overlay needs pixels: undo the normalisation the caller applied
        mean = torch.tensor(recipe.mean).view(3, 1, 1)
        std = torch.tensor(recipe.std).view(3, 1, 1)
        original = tf.to_pil_image((tensor * std + mean).clamp(0, 1))
    return PreparedImage(tensor=tensor, geometry=geometry, original=original)
