"""Decoding and preparing images: upright, 8-bit, and bounded before any pixel is decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as tf
from PIL import Image

from camserve.server.preprocess import (
    ImageError,
    ImageHeader,
    InputRecipe,
    check_size,
    decode,
    decode_for_model,
    from_normalised_array,
    from_uint8_array,
    peek,
    prepare,
    resized_size,
)
from camserve.server.settings import IMAGENET_MEAN, IMAGENET_STD, LimitsSettings
from tests._support.servers import png16_bytes, png_bytes, seeded_images

FIELD = "images[0].encoded"
LIMITS = LimitsSettings()
RECIPE = InputRecipe(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
PICTURE = seeded_images(1, size=(60, 90), seed=4)[0]  # 90 wide, 60 high
# What the 8-bit samples look like in 16 bits: v * 257, plus noise that still rounds back to v.
NOISE = np.random.default_rng(0).integers(-128, 129, size=PICTURE.shape)
PICTURE_16 = np.clip(PICTURE.astype(np.int64) * 257 + NOISE, 0, 65535).astype(np.uint16)


def encode(image: Image.Image, kind: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **save)
    return buffer.getvalue()


def with_orientation(image: Image.Image, kind: str, orientation: int, **save: object) -> bytes:
    """`image` saved as `kind` with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, kind, exif=exif, **save)


def model_input(data: bytes) -> np.ndarray:
    return prepare(decode(data, FIELD, LIMITS), RECIPE, keep_original=False).tensor.numpy()


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white() -> None:
    data = png16_bytes(PICTURE_16[..., 1])
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode(data, FIELD, LIMITS)
    assert decoded.mode == "RGB"
    eight_bit = np.repeat(PICTURE[..., 1:2], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(decoded), eight_bit)
    expected = model_input(png_bytes(eight_bit))
    np.testing.assert_array_equal(model_input(data), expected)


def test_16_bit_rgb_png_matches_its_8_bit_version_within_one_level() -> None:
    data = png16_bytes(PICTURE_16)
    decoded = np.asarray(decode(data, FIELD, LIMITS)).astype(int)
    assert np.abs(decoded - PICTURE).max() <= 1
    # One level of difference in the pixels is at most 1/255 before normalisation.
    ours = tf.to_tensor(decode(data, FIELD, LIMITS)).numpy()
    assert np.abs(ours - tf.to_tensor(Image.fromarray(PICTURE)).numpy()).max() <= 1 / 255 + 1e-7


def test_16_bit_values_round_to_the_nearest_8_bit_level() -> None:
    """v / 257 to the nearest integer: 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 65535 -> 255."""
    ramp = np.array([[0, 128, 129, 257, 385, 386, 65278, 65406, 65407, 65535]], dtype=np.uint16)
    data = png16_bytes(np.repeat(ramp, 8, axis=0))
    decoded = np.asarray(decode(data, FIELD, LIMITS))[0, :, 0]
    np.testing.assert_array_equal(decoded, [0, 0, 1, 1, 1, 2, 254, 254, 255, 255])


@pytest.mark.parametrize(
    ("orientation", "upright"), [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)]
)
def test_exif_rotated_jpeg_is_decoded_as_the_rotated_picture(
    orientation: int, upright: Image.Transpose
) -> None:
    """A phone stores a portrait photo sideways and says so in EXIF: orientation 6 means
    "rotate 90 degrees clockwise to view", 8 counter-clockwise. The model must see the photo
    as a viewer shows it: the stored pixels rotated."""
    stored = Image.fromarray(PICTURE)
    tagged = with_orientation(stored, "JPEG", orientation, quality=95)
    untagged = encode(stored, "JPEG", quality=95)
    rotated = decode(untagged, FIELD, LIMITS).transpose(upright)
    decoded = decode(tagged, FIELD, LIMITS)
    assert decoded.size == (60, 90)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(rotated))
    prepared = prepare(decoded, RECIPE, keep_original=True)
    expected = prepare(rotated, RECIPE, keep_original=False)
    np.testing.assert_array_equal(prepared.tensor.numpy(), expected.tensor.numpy())
    assert prepared.geometry == expected.geometry
    assert prepared.geometry.original_hw == (90, 60)
    assert prepared.original is not None
    assert prepared.original.size == (60, 90)  # the overlay is drawn on the upright photo
    assert peek(tagged, FIELD, LIMITS) == ImageHeader(60, 90, "JPEG")


@pytest.mark.parametrize(("kind", "save"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_exif_orientation_applies_to_png_and_webp(kind: str, save: dict[str, object]) -> None:
    """Lossless files: the decoded image is exactly the upright picture."""
    stored = Image.fromarray(PICTURE).transpose(Image.Transpose.ROTATE_90)
    data = with_orientation(stored, kind, 6, **save)
    np.testing.assert_array_equal(np.asarray(decode(data, FIELD, LIMITS)), PICTURE)
    assert peek(data, FIELD, LIMITS) == ImageHeader(90, 60, kind)


def test_peek_reads_only_the_header() -> None:
    """A PNG cut right after its header still peeks: no pixel is decoded. Decoding it fails."""
    data = png_bytes(PICTURE)
    header_only = data[: data.index(b"IDAT") + 4]
    assert peek(header_only, FIELD, LIMITS) == ImageHeader(90, 60, "PNG")
    with pytest.raises(ImageError, match="truncated"):
        decode(header_only, FIELD, LIMITS)


@pytest.mark.parametrize(
    ("width", "height", "ratio"), [(4000, 8, "500.0"), (8, 40000, "5000.0"), (161, 8, "20.1")]
)
def test_extreme_aspect_ratios_are_refused_from_the_header(
    width: int, height: int, ratio: str
) -> None:
    """An 8x4000 PNG is 96 KB of pixels, but resized to a shorter side of 256 it would be
    256x128000. It is refused before decoding: a copy cut after its header is refused alike."""
    data = png_bytes(np.zeros((height, width, 3), dtype=np.uint8))
    header_only = data[: data.index(b"IDAT") + 4]
    message = (
        f"{FIELD}: image is {width}x{height}, an aspect ratio of {ratio}:1, over the limit of "
        "20:1; crop or pad it closer to square before sending"
    )
    for refused in (data, header_only):
        with pytest.raises(ImageError) as peeked:
            peek(refused, FIELD, LIMITS)
        assert str(peeked.value) == message
        with pytest.raises(ImageError) as decoded:
            decode(refused, FIELD, LIMITS)
        assert str(decoded.value) == message
    with pytest.raises(ImageError, match="aspect ratio"):
        from_uint8_array(np.zeros((height, width, 3), dtype=np.uint8), "images[0].tensor", LIMITS)


def test_the_largest_accepted_aspect_ratio_resizes_within_bounds() -> None:
    image = decode(png_bytes(np.zeros((8, 160, 3), dtype=np.uint8)), FIELD, LIMITS, RECIPE)
    prepared = prepare(image, RECIPE, keep_original=False)
    assert prepared.geometry.resized_hw == (256, 5120)
    assert prepared.tensor.shape == (3, 224, 224)


def test_a_model_whose_resize_makes_the_image_too_large_refuses_it() -> None:
    """With a shorter side resized to 512, a 100x2000 image (20:1) would become 512x10240."""
    recipe = InputRecipe(resize=512, crop=448, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    data = png_bytes(np.zeros((100, 2000, 3), dtype=np.uint8))
    message = (
        f"{FIELD}: image is 2000x100, which this model resizes to 10240x512 = 5242880 pixels, "
        "over the limit of 4194304; crop it closer to square before sending"
    )
    with pytest.raises(ImageError) as peeked:
        peek(data, FIELD, LIMITS, recipe)
    assert str(peeked.value) == message
    with pytest.raises(ImageError) as decoded:
        decode(data, FIELD, LIMITS, recipe)
    assert str(decoded.value) == message
    assert peek(data, FIELD, LIMITS, RECIPE) == ImageHeader(2000, 100, "PNG")


@pytest.mark.parametrize("size", [(90, 60), (60, 90), (8, 160), (333, 257), (1000, 999), (7, 7)])
@pytest.mark.parametrize("resize", [0, 224, 256])
def test_resized_size_is_what_prepare_makes(size: tuple[int, int], resize: int) -> None:
    recipe = InputRecipe(resize=resize, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    expected = tf.resize(Image.new("RGB", size), resize).size if resize else (224, 224)
    assert resized_size(*size, recipe) == expected


def test_the_pixel_limit_and_the_smallest_side_come_first() -> None:
    with pytest.raises(ImageError, match=r"image is 9000x5000 = 45000000 pixels, over the limit"):
        check_size(9000, 5000, FIELD, LIMITS)
    with pytest.raises(ImageError, match=r"image is 4x100; both sides must be >= 8"):
        check_size(4, 100, FIELD, LIMITS)
    check_size(8, 160, FIELD, LIMITS, RECIPE)


def test_a_bare_pixel_limit_keeps_the_other_limits_at_their_defaults() -> None:
    data = png_bytes(np.zeros((8, 400, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="aspect ratio of 50.0:1"):
        decode(data, FIELD, 1_000_000)
    with pytest.raises(ImageError, match="over the limit of 1000"):
        decode(png_bytes(PICTURE), FIELD, 1000)


def smooth_photo(width: int, height: int) -> Image.Image:
    """A photo-like picture (smooth gradients and shapes), so reduced decoding is comparable."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 127 + 127 * np.sin(x / width * 6)
    green = 127 + 127 * np.cos(y / height * 5)
    blue = 255 * ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (height / 3) ** 2)
    return Image.fromarray(np.stack([red, green, blue], axis=2).astype(np.uint8))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_at_reduced_scale_with_the_original_geometry(
    orientation: int,
) -> None:
    """A 2000x1500 photo for a 256-pixel resize decodes at 1/4 scale (500x375, still at least
    the 341x256 the model resizes it to); the geometry is the photo's as sent, and the model
    input stays close to the full decode's."""
    stored = smooth_photo(2000, 1500)
    data = with_orientation(stored, "JPEG", orientation, quality=90)
    reduced = decode_for_model(data, FIELD, LIMITS, RECIPE)
    full = decode_for_model(data, FIELD, LIMITS, RECIPE, reduce=False)
    sideways = orientation == 6
    shown = (1500, 2000) if sideways else (2000, 1500)
    assert reduced.original_size == full.original_size == shown
    assert full.image.size == shown
    assert reduced.image.size == ((375, 500) if sideways else (500, 375))
    fast = prepare(reduced.image, RECIPE, False, reduced.original_size)
    slow = prepare(full.image, RECIPE, False, full.original_size)
    assert fast.geometry == slow.geometry
    assert fast.geometry.original_hw == (shown[1], shown[0])
    difference = np.abs(fast.pixels.numpy().astype(int) - slow.pixels.numpy().astype(int))
    assert difference.mean() < 2.0  # of 255 levels
    assert decode(data, FIELD, LIMITS, RECIPE).size == shown  # `decode` never reduces


def test_small_jpegs_and_other_formats_are_decoded_whole() -> None:
    small = encode(smooth_photo(400, 300), "JPEG", quality=90)  # under twice 341x256
    assert decode_for_model(small, FIELD, LIMITS, RECIPE).image.size == (400, 300)
    png = encode(smooth_photo(2000, 1500), "PNG")
    assert decode_for_model(png, FIELD, LIMITS, RECIPE).image.size == (2000, 1500)


def test_prepared_pixels_normalise_exactly_as_torchvision_does() -> None:
    image = Image.fromarray(PICTURE)
    prepared = prepare(image, RECIPE, keep_original=False)
    assert prepared.pixels.dtype == torch.uint8
    resized = tf.center_crop(tf.resize(image, RECIPE.resize), [RECIPE.crop, RECIPE.crop])
    expected = tf.normalize(tf.to_tensor(resized), list(RECIPE.mean), list(RECIPE.std))
    assert torch.equal(prepared.tensor, expected)


def test_float_inputs_for_a_channels_last_engine_keep_their_values_in_pixel_order() -> None:
    """A CPU engine runs channels_last: float inputs are laid out (H, W, 3) in memory, like
    decoded pixels, so its stager copies them without transposing; the values are the same."""
    array = np.random.default_rng(3).standard_normal((3, 224, 224), dtype=np.float32)
    array.flags.writeable = False  # as the wire's bytes are
    plain = from_normalised_array(array, "images[0].tensor", RECIPE, keep_original=False)
    by_pixel = from_normalised_array(
        array, "images[0].tensor", RECIPE, keep_original=True, channels_last=True
    )
    assert plain.pixels.is_contiguous()
    assert by_pixel.pixels.permute(1, 2, 0).is_contiguous()
    assert torch.equal(by_pixel.pixels, torch.from_numpy(array.copy()))
    assert by_pixel.original is not None
    assert by_pixel.original.size == (224, 224)
