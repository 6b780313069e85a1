"""JPEG decoding on the model's GPU: a request's JPEGs decoded together by nvJPEG, then
uprighted, resized and cropped there, so their pixels never pass through the host's cores.

Used for models on CUDA, for JPEGs without an overlay (an overlay needs the photo on the host).
Every image is first checked from its header, exactly as on the CPU path
(`preprocess.read_header`), so a refused image gets the same precise error; the same read gives
its EXIF orientation. An image the device decoder cannot read (CMYK, arithmetic coding, a
corrupt stream) comes back as None and the caller prepares it on the CPU path, which decodes
what it can and names what it cannot. The pixels match the CPU path's
within a few levels (another IDCT, and torch's antialiased resize instead of Pillow's).

Decoding is torchvision's `decode_jpeg` (nvJPEG on CUDA, libjpeg on the CPU, which is how the
tests exercise this module). torchvision 0.29 marks its image codecs deprecated in favour of
TorchCodec; the call is isolated here so the move is one function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.v2.functional as tvf
from torchvision.io import ImageReadMode, decode_jpeg

from camserve.server.engine.shaping import Geometry
from camserve.server.preprocess import PreparedImage, read_header, resized_size
from camserve.server.records import InputRecipe
from camserve.server.settings import LimitsSettings

JPEG_MAGIC = b"\xff\xd8\xff"

# EXIF orientation -> what turns the stored (3, H, W) pixels upright (as Pillow's exif_transpose).
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def is_jpeg(data: bytes) -> bool:
    return data.startswith(JPEG_MAGIC)


def _decode(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) RGB per JPEG, stored orientation; None where the decoder failed. One
    batched call first; if it fails, each image alone, so one bad file fails only itself."""
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for one in encoded:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def prepare_jpegs(
    items: Sequence[tuple[bytes, str]],
    recipe: InputRecipe,
    limits: LimitsSettings,
    device: torch.device,
) -> list[PreparedImage | None]:
    """Model inputs for (JPEG bytes, request field) pairs, decoded on `device`; None for those
    to prepare on the CPU path. Raises the CPU path's ImageError for an image it refuses."""
    headers = [read_header(data, field, limits, recipe) for data, field in items]
    decoded = _decode([data for data, _ in items], device)
    prepared: list[PreparedImage | None] = []
    for (header, orientation), pixels in zip(headers, decoded, strict=True):
        if pixels is None:
            prepared.append(None)
            continue
        upright = _UPRIGHT.get(orientation, lambda x: x)(pixels)
        if tuple(upright.shape[1:]) != (header.height, header.width):
            prepared.append(None)  # the decoder read another size than the header says
            continue
        prepared.append(_resized_and_cropped(upright, recipe))
    return prepared


def _resized_and_cropped(pixels: torch.Tensor, recipe: InputRecipe) -> PreparedImage:
    """`preprocess.prepare` on a (3, H, W) uint8 tensor: resize (bilinear, antialiased), then
    the centre crop."""
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    resized_w, resized_h = resized_size(width, height, recipe)
    resized = tvf.resize(
        pixels,
        [resized_h, resized_w],
        interpolation=tvf.InterpolationMode.BILINEAR,
        antialias=True,
    )
    top = int(round((resized_h - recipe.crop) / 2.0))
    left = int(round((resized_w - recipe.crop) / 2.0))
    cropped = tvf.crop(resized, top, left, recipe.crop, recipe.crop).contiguous()
    return PreparedImage(
        pixels=cropped,
        geometry=Geometry(
            original_hw=(height, width),
            resized_hw=(resized_h, resized_w),
            crop_box=(top, left, recipe.crop, recipe.crop),
        ),
        original=None,
        mean=recipe.mean,
        std=recipe.std,
    )
