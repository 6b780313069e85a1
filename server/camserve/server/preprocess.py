"""Turns request images into model inputs, recording the geometry to map heatmaps back.

Runs on CPU worker threads, outside the event loop and alongside the running batch. Every check
that can refuse an image happens here, before it reaches the batcher, and raises `ImageError`
naming the request field.

Images are decoded the way a viewer shows them: EXIF orientation applied (phone photos are often
stored sideways), 16-bit grayscale scaled to 8 bits rather than clipped, and everything else
converted to RGB by Pillow. The geometry limits (`check_size`) are checked from the file header
before any pixel is decoded; `peek` runs only those checks, so an image can be refused before
any work is spent on it.

Large JPEGs are decoded at reduced size in the DCT domain (Pillow's `draft`, libjpeg's scaled
IDCT) when the model's resize target is at most half their size: a 4000x3000 photo for a
256-pixel model decodes as 500x375, about 1/20 of the work, and the resize that follows starts
from that. The geometry still records the original size, so heatmaps map back onto the photo
as sent. Images kept for an overlay are decoded whole.

The model input leaves here as uint8 pixels when the image came as pixels: `ImagePixels` are
normalised per batch, on the engine's device (`camserve.server.staging`), so a GPU receives a
quarter of the bytes.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from camserve.server.engine.shaping import Geometry
from camserve.server.errors import InvalidRequest
from camserve.server.records import InputRecipe
from camserve.server.settings import MIN_IMAGE_SIDE, LimitsSettings

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
MIN_SIDE = MIN_IMAGE_SIDE
_ORIENTATION_TAG = 0x0112
_SIDEWAYS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
# Modes Pillow decodes 16-bit grayscale PNGs to ("I" in older Pillow): values 0..65535.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageError(InvalidRequest):
    """An image that cannot be used; the message names the field and what to send instead."""


@dataclass(frozen=True)
class PreparedImage:
    """A model input plus what is needed to map its heatmap back.

    `pixels` is (3, crop, crop): uint8 RGB still to be normalised with `mean` and `std` (what
    decoded and uint8 images give), or float32 already normalised (what float32 tensors are).
    """

    pixels: torch.Tensor
    geometry: Geometry
    original: Image.Image | None  # kept only when an overlay is rendered
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def tensor(self) -> torch.Tensor:
        """The normalised float32 model input, on the CPU."""
        if self.pixels.dtype != torch.uint8:
            return self.pixels
        return normalise_pixels(self.pixels, self.mean, self.std)


def normalise_pixels(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (..., 3, H, W) RGB as the model's float32 input, by the same operations as
    torchvision's `to_tensor` then `normalize`, so values are identical on every device."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.float().div_(255).sub_(mean_t).div_(std_t)


class DecodedImage(NamedTuple):
    """An upright RGB image and the size it has as sent, which `draft` decoding may reduce."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height), EXIF orientation applied


class ImageHeader(NamedTuple):
    """What an encoded image's header says: its size as displayed, and its format."""

    width: int
    height: int
    format: str


def resized_size(width: int, height: int, recipe: InputRecipe) -> tuple[int, int]:
    """(width, height) of the image `prepare` makes before the crop (torchvision's rule: the
    shorter side becomes `resize`, the longer one keeps the aspect ratio, rounded down)."""
    if not recipe.resize:
        return recipe.crop, recipe.crop
    short, long = min(width, height), max(width, height)
    new_long = int(recipe.resize * long / short)
    return (recipe.resize, new_long) if width <= height else (new_long, recipe.resize)


def check_size(
    width: int,
    height: int,
    field: str,
    limits: LimitsSettings,
    recipe: InputRecipe | None = None,
) -> None:
    """Refuses an image size the server will not work on: over `max_pixels`, a side below
    MIN_SIDE, more elongated than `max_aspect_ratio`, or (given the model's `recipe`) resized to
    more than `max_resized_pixels`. Needs only the size, so it runs before decoding."""
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageError(
            f"{field}: image is {width}x{height} = {pixels} pixels, over the limit of "
            f"{limits.max_pixels}; downscale it before sending"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{field}: image is {width}x{height}; both sides must be >= {MIN_SIDE}")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"{field}: image is {width}x{height}, an aspect ratio of {ratio:.1f}:1, over the "
            f"limit of {limits.max_aspect_ratio:g}:1; crop or pad it closer to square before "
            "sending"
        )
    if recipe is not None:
        resized_w, resized_h = resized_size(width, height, recipe)
        if resized_w * resized_h > limits.max_resized_pixels:
            raise ImageError(
                f"{field}: image is {width}x{height}, which this model resizes to "
                f"{resized_w}x{resized_h} = {resized_w * resized_h} pixels, over the limit of "
                f"{limits.max_resized_pixels}; crop it closer to square before sending"
            )


def _as_limits(limits: LimitsSettings | int) -> LimitsSettings:
    """The limits to apply; a bare int is `max_pixels` with the other limits at their defaults."""
    return limits if isinstance(limits, LimitsSettings) else LimitsSettings(max_pixels=limits)


@contextlib.contextmanager
def _decoding(field: str, max_pixels: int) -> Iterator[None]:
    """Turns Pillow's failures into ImageErrors naming `field`."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{field}: image declares more pixels than the limit of {max_pixels}; "
            "downscale it before sending"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{field}: not a decodable image; send JPEG, PNG or WebP file contents"
        ) from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageError(f"{field}: corrupt or truncated image ({exc})") from None


def _open(data: bytes, field: str) -> Image.Image:
    """The image with only its header read."""
    if not data:
        raise ImageError(f"{field}: empty image bytes; send JPEG, PNG or WebP file contents")
    return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)


def _displayed_size(image: Image.Image, orientation: int | None = None) -> tuple[int, int]:
    """(width, height) as a viewer shows the image, from the header: EXIF orientations 5 to 8
    swap the sides. A PNG's EXIF chunk may follow its pixel data, so a PNG without one in its
    header counts as upright here; `decode` applies whatever orientation it finds after
    decoding, and no limit depends on which side is which. `orientation`: the image's EXIF
    orientation when already read."""
    width, height = image.size
    if orientation is None:
        orientation = exif_orientation(image)
    return (height, width) if orientation in _SIDEWAYS else (width, height)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8) in an opened image's header; 1 (upright) when there is
    none or it cannot be read, as viewers do."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        # The base class reads the header's EXIF (and XMP) only; PngImageFile.getexif would
        # decode the pixels to look for a late chunk.
        orientation = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except (SyntaxError, ValueError, TypeError, struct.error):
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def peek(
    data: bytes, field: str, limits: LimitsSettings, recipe: InputRecipe | None = None
) -> ImageHeader:
    """Reads only the header of an encoded image: its size as displayed (EXIF orientation
    applied) and its format, refusing what `check_size` refuses, without decoding a pixel.
    Cheap enough to run before admitting a request."""
    return read_header(data, field, limits, recipe)[0]


def read_header(
    data: bytes, field: str, limits: LimitsSettings, recipe: InputRecipe | None = None
) -> tuple[ImageHeader, int]:
    """`peek`, with the EXIF orientation (1 to 8) it read, for decoders that upright the
    pixels themselves."""
    with _decoding(field, limits.max_pixels), _open(data, field) as image:
        orientation = exif_orientation(image)
        width, height = _displayed_size(image, orientation)
        header = ImageHeader(width, height, str(image.format))
    check_size(width, height, field, limits, recipe)
    return header, orientation


def decode(
    data: bytes, field: str, limits: LimitsSettings | int, recipe: InputRecipe | None = None
) -> Image.Image:
    """Decodes JPEG/PNG/WebP bytes to upright RGB at full size, refusing sizes `check_size`
    refuses before decoding pixels. `limits` may be a bare `max_pixels` (the other limits at
    their defaults)."""
    return decode_for_model(data, field, _as_limits(limits), recipe, reduce=False).image


def decode_for_model(
    data: bytes,
    field: str,
    limits: LimitsSettings,
    recipe: InputRecipe | None,
    *,
    reduce: bool = True,
) -> DecodedImage:
    """Like `decode`, but with `reduce` (and a `recipe`) a JPEG at least twice the size the
    model resizes it to is decoded at a reduced scale (1/2, 1/4 or 1/8) that stays at or above
    that size."""
    with _decoding(field, limits.max_pixels):
        image = _open(data, field)
        width, height = _displayed_size(image)
        check_size(width, height, field, limits, recipe)
        if reduce and recipe is not None and image.format == "JPEG":
            target_w, target_h = resized_size(width, height, recipe)
            if (width, height) != image.size:  # stored sideways: draft works on stored sides
                target_w, target_h = target_h, target_w
            image.draft("RGB", (target_w, target_h))
        image.load()
        _upright(image)
    return DecodedImage(_to_rgb(image), (width, height))


def _upright(image: Image.Image) -> None:
    """Applies the EXIF orientation in place, as viewers do; broken metadata is ignored."""
    with contextlib.suppress(SyntaxError, ValueError, TypeError, KeyError, struct.error):
        ImageOps.exif_transpose(image, in_place=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit grayscale (anything above 255 turns
    white), so those values are scaled to 8 bits first, rounding v / 257 (65535 -> 255)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.dtype.kind == "i":  # mode "I" is 32-bit signed
            values = np.clip(values, 0, 65535)
        values = values.astype(np.uint16, copy=False)
        quotient = values // 257
        quotient += (values - quotient * 257) >= 129  # to nearest: r / 257 >= 1/2 iff r >= 129
        image = Image.fromarray(quotient.astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def from_uint8_array(
    array: np.ndarray, field: str, limits: LimitsSettings | int, recipe: InputRecipe | None = None
) -> Image.Image:
    """An RGB image from a uint8 (H, W, 3) array, refusing what `check_size` refuses."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"{field}: uint8 tensors must be HxWx3 RGB, got shape {list(array.shape)}")
    check_size(array.shape[1], array.shape[0], field, _as_limits(limits), recipe)
    return Image.fromarray(np.ascontiguousarray(array))


def prepare(
    image: Image.Image,
    recipe: InputRecipe,
    keep_original: bool,
    original_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """Resizes and centre-crops `image` as the model was trained to see it (torchvision's
    `Resize` then `CenterCrop`), into uint8 pixels that `PreparedImage.tensor` (or the batch's
    staging) normalises. `original_size` (width, height) is the size of the image as sent when
    `image` was decoded at a reduced scale; the resize target is computed from it."""
    width, height = original_size or image.size
    resized_w, resized_h = resized_size(width, height, recipe)
    resized = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
    top = int(round((resized_h - recipe.crop) / 2.0))
    left = int(round((resized_w - recipe.crop) / 2.0))
    cropped = resized.crop((left, top, left + recipe.crop, top + recipe.crop))
    # (3, H, W) over the decoder's own (H, W, 3) memory, with no transposing copy: the batch is
    # staged and normalised in that layout, which is the channels_last input the CPU engine
    # runs (`staging.InputStager`).
    pixels = torch.from_numpy(np.array(cropped)).permute(2, 0, 1)
    geometry = Geometry(
        original_hw=(height, width),
        resized_hw=(resized_h, resized_w),
        crop_box=(top, left, recipe.crop, recipe.crop),
    )
    return PreparedImage(
        pixels=pixels,
        geometry=geometry,
        original=image if keep_original else None,
        mean=recipe.mean,
        std=recipe.std,
    )


def from_normalised_array(
    array: np.ndarray,
    field: str,
    recipe: InputRecipe,
    keep_original: bool,
    channels_last: bool = False,
) -> PreparedImage:
    """A float32 (3, H, W) array that the caller already resized and normalised, used as is.

    With `channels_last` (the engine runs on the CPU in that layout) its values are laid out
    (H, W, 3) in memory, as decoded pixels are: the engine's single-threaded stager then copies
    them straight into its batch, and the transposing copy is made here, in a process that
    scales with the cores."""
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
    tensor = torch.from_numpy(array.copy())  # the wire's bytes are read-only
    if channels_last:
        by_pixel = torch.empty((size, size, 3), dtype=tensor.dtype)
        tensor = by_pixel.copy_(tensor.permute(1, 2, 0)).permute(2, 0, 1)
    original: Image.Image | None = None
    if keep_original:  # an overlay needs pixels: undo the normalisation the caller applied
        mean = torch.tensor(recipe.mean).view(3, 1, 1)
        std = torch.tensor(recipe.std).view(3, 1, 1)
        original = tf.to_pil_image((tensor * std + mean).clamp(0, 1))
    return PreparedImage(pixels=tensor, geometry=geometry, original=original)
