"""Turning the image forms callers have into wire `Image`s, and back into pictures for drawing.

Files and encoded bytes travel as they are (the server decodes them with the model's recipe).
PIL images and uint8 arrays travel as raw uint8 HxWx3 RGB tensors: lossless, and no encoding cost
on the client. A float 3xHxW array is taken to be already resized and normalised for the model.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import to_proto

ImageInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage.Image | np.ndarray
)
"""A file path, encoded file bytes (JPEG/PNG/WebP), a PIL image, or a numpy array."""

_FORMS = (
    "a file path, encoded bytes, a PIL image, a uint8 HxWx3 RGB array "
    "or a float32 3xHxW normalised array"
)


def to_wire(image: ImageInput) -> pb.Image:
    """The wire `Image` (without a target) for any accepted input form."""
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise ValueError("image bytes are empty; pass the contents of a JPEG, PNG or WebP file")
        return pb.Image(encoded=bytes(image))
    if isinstance(image, PILImage.Image):
        return pb.Image(tensor=to_proto(np.asarray(image.convert("RGB"))))
    if isinstance(image, np.ndarray):
        return pb.Image(tensor=to_proto(_check_array(image)))
    raise TypeError(f"image must be {_FORMS}; got {type(image).__name__}")


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        if array.ndim == 3 and array.shape[2] == 3:
            return array
        raise ValueError(
            f"a uint8 image array must be HxWx3 RGB; got shape {array.shape} "
            "(convert grey or RGBA images to RGB first)"
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim == 3 and array.shape[0] == 3:
            return array.astype(np.float32, copy=False)
        raise ValueError(
            f"a float image array must be 3xHxW, already normalised; got shape {array.shape} "
            "(pass a uint8 HxWx3 array to have the server preprocess it)"
        )
    raise TypeError(f"image arrays must be uint8 HxWx3 or float32 3xHxW; got dtype {array.dtype}")


def to_pil(image: ImageInput) -> PILImage.Image:
    """The picture itself as an RGB PIL image, for overlays; not possible for normalised arrays.

    Files are turned upright by their EXIF orientation, as the server does before explaining
    them, so that the heatmap lands where it belongs."""
    if isinstance(image, (str, os.PathLike)):
        with PILImage.open(image) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        with PILImage.open(io.BytesIO(bytes(image))) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return PILImage.fromarray(_check_array(image))
    raise TypeError(
        f"cannot draw on {type(image).__name__} {getattr(image, 'dtype', '')}: overlays need "
        "a path, encoded bytes, a PIL image or a uint8 HxWx3 array"
    )
