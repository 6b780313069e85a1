"""Feature maps to pixels and to [0, 1]: pure tensor functions."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import scale_cam_image

from camserve.server.engine import (
    EngineError,
    Geometry,
    normalise,
    output_bytes,
    shape_heatmaps,
    to_input,
    to_original,
    to_size,
)
from camserve.v1.tensors import to_proto
from tests._support.servers import onto_original_float64


def test_to_input_is_cv2_bilinear() -> None:
    maps = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0))
    ours = to_input(maps, (224, 160))
    assert ours.shape == (3, 224, 160)
    for k in range(3):
        expected = cv2.resize(maps[k].numpy(), (160, 224), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ours[k].numpy(), expected, atol=1e-5)
    assert to_input(maps[0], (14, 10)).shape == (14, 10)  # a single map keeps its rank


def test_normalise_scales_each_map_to_unit_range() -> None:
    maps = torch.stack([torch.arange(12.0).view(3, 4), -5 * torch.arange(12.0).view(3, 4)])
    out = normalise(maps)
    for k in range(2):
        assert float(out[k].min()) == 0.0
        assert float(out[k].max()) == 1.0
    torch.testing.assert_close(out[0], torch.arange(12.0).view(3, 4) / 11)


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0, 1e-30])
def test_normalise_constant_maps_to_zeros(value: float) -> None:
    maps = torch.full((2, 5, 5), value)
    out = normalise(maps)
    assert torch.equal(out, torch.zeros(2, 5, 5))
    # Upsampling a constant leaves float32 rounding noise, which must not be blown up to [0, 1].
    assert torch.equal(normalise(to_input(maps, (224, 224))), torch.zeros(2, 224, 224))


def test_normalising_before_upsampling_changes_nothing() -> None:
    """pytorch-grad-cam normalises, resizes, then normalises again: the same as normalising once
    after resizing, because min-max scaling is affine and bilinear resizing commutes with it."""
    raw = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(1)) * 1e3
    torch.testing.assert_close(
        normalise(to_input(raw, (224, 224))), normalise(to_input(normalise(raw), (224, 224)))
    )


def test_to_original_undoes_resize_and_centre_crop() -> None:
    # A 300x400 (h x w) image, shorter side resized to 256 -> 256x341, centre crop 224.
    geometry = Geometry(original_hw=(300, 400), resized_hw=(256, 341), crop_box=(16, 58, 224, 224))
    inside = torch.ones(1, 7, 7)
    out = to_original(inside, geometry)
    assert out.shape == (1, 300, 400)
    # The crop box in original pixels: rows 16..240 of 256 -> 18.75..281.25 of 300, columns
    # 58..282 of 341 -> 68.0..330.8 of 400.
    assert torch.all(out[0, 22:278, 72:327] > 0.999)
    assert torch.all(out[0, :16] == 0)
    assert torch.all(out[0, 285:] == 0)
    assert torch.all(out[0, :, :65] == 0)
    assert torch.all(out[0, :, 334:] == 0)
    mass_box = float(out[0, 19:281, 68:331].sum())
    assert mass_box / float(out.sum()) > 0.98


def test_to_size_draws_over_the_original_at_any_size() -> None:
    geometry = Geometry(original_hw=(300, 400), resized_hw=(256, 341), crop_box=(16, 58, 224, 224))
    maps = torch.zeros(2, 224, 224)
    maps[0, :112] = 1.0  # top half of the crop
    out = to_size(maps, (150, 200), geometry)
    assert out.shape == (2, 150, 200)
    assert float(out[1].abs().max()) == 0.0
    assert float(out[0, 15:60, 40:160].min()) > 0.99  # the top half of the crop, in the original
    assert float(out[0, 80:].max()) < 1e-6
    single = to_size(maps[0], (150, 200), geometry)
    torch.testing.assert_close(single, out[0])


def test_a_crop_reaching_outside_the_resized_image_is_clipped() -> None:
    # An 100x100 image "centre-cropped" to 224 gets padded: the box starts at -62.
    geometry = Geometry(
        original_hw=(100, 100), resized_hw=(100, 100), crop_box=(-62, -62, 224, 224)
    )
    maps = torch.zeros(1, 224, 224)
    maps[0, 62:162, 62:162] = 1.0  # exactly the image part of the crop
    out = to_original(maps, geometry)
    assert torch.all(out == 1.0)


def test_identity_geometry_is_plain_upsampling() -> None:
    raw = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(2))
    geometry = Geometry(original_hw=(224, 224), resized_hw=(224, 224), crop_box=(0, 0, 224, 224))
    torch.testing.assert_close(to_original(raw, geometry), to_input(raw, (224, 224)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"original_hw": (0, 10), "resized_hw": (5, 5), "crop_box": (0, 0, 5, 5)}, "original_hw"),
        ({"original_hw": (10, 10), "resized_hw": (5,), "crop_box": (0, 0, 5, 5)}, "resized_hw"),
        ({"original_hw": (10, 10), "resized_hw": (5, 5), "crop_box": (0, 0, 0, 5)}, "crop_box"),
    ],
)
def test_bad_geometry_is_refused(kwargs: dict[str, tuple[int, ...]], match: str) -> None:
    with pytest.raises(EngineError, match=match):
        Geometry(**kwargs)  # type: ignore[arg-type]


def test_bad_map_shapes_are_refused() -> None:
    with pytest.raises(EngineError, match=r"maps must be \(K, h, w\) or \(h, w\)"):
        to_input(torch.zeros(1, 1, 7, 7), (224, 224))
    with pytest.raises(EngineError, match="input_hw"):
        to_input(torch.zeros(1, 7, 7), (0, 224))


# --- shape_heatmaps: one normalisation rule at every resolution ------------------------------

# A 300x400 (h x w) image, shorter side resized to 256 -> 256x341, centre crop 224.
LANDSCAPE = Geometry(original_hw=(300, 400), resized_hw=(256, 341), crop_box=(16, 58, 224, 224))
GEOMETRIES = [
    pytest.param(LANDSCAPE, (300, 400), id="landscape-original"),
    pytest.param(LANDSCAPE, (150, 200), id="landscape-downscaled"),
    pytest.param(LANDSCAPE, (1000, 37), id="landscape-stretched"),
    pytest.param(
        Geometry(original_hw=(400, 300), resized_hw=(341, 256), crop_box=(58, 16, 224, 224)),
        (400, 300),
        id="portrait-original",
    ),
    pytest.param(
        Geometry(original_hw=(100, 100), resized_hw=(100, 100), crop_box=(-62, -62, 224, 224)),
        (100, 100),
        id="padded-crop",
    ),
    pytest.param(
        Geometry(original_hw=(64, 48), resized_hw=(224, 224), crop_box=(0, 0, 224, 224)),
        (64, 48),
        id="resized-straight-to-crop",
    ),
    pytest.param(
        Geometry(original_hw=(64, 48), resized_hw=(224, 224), crop_box=(0, 0, 224, 224)),
        (500, 700),
        id="whole-canvas-upscaled",
    ),
    pytest.param(
        Geometry(original_hw=(8, 160), resized_hw=(256, 5120), crop_box=(16, 2448, 224, 224)),
        (8, 160),
        id="aspect-20",
    ),
    pytest.param(
        Geometry(original_hw=(224, 224), resized_hw=(224, 224), crop_box=(0, 0, 224, 224)),
        (224, 224),
        id="identity",
    ),
]


def canvas_reference(
    maps: torch.Tensor, size_hw: tuple[int, int], geometry: Geometry
) -> np.ndarray:
    """The former mapping, kept as the reference: crop-sized maps pasted into a zero canvas of
    the resized image's size, which F.interpolate then scales to `size_hw`."""
    top, left, height, width = geometry.crop_box
    cropped = torch.nn.functional.interpolate(
        maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[:, 0]
    rows, cols = geometry.resized_hw
    canvas = torch.zeros((maps.shape[0], rows, cols))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, cols)
    canvas[:, y0:y1, x0:x1] = cropped[:, y0 - top : y1 - top, x0 - left : x1 - left]
    resized = torch.nn.functional.interpolate(
        canvas[:, None], size=size_hw, mode="bilinear", align_corners=False
    )
    return resized[:, 0].numpy()


def raw_maps(count: int = 3, seed: int = 3) -> torch.Tensor:
    """Seeded raw maps whose minimum is well above zero, as a ReLU'd CAM often has."""
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(count, 7, 7, generator=generator) * 40.0


@pytest.mark.parametrize(("geometry", "size"), GEOMETRIES)
def test_mapping_onto_the_original_equals_the_canvas_it_no_longer_builds(
    geometry: Geometry, size: tuple[int, int]
) -> None:
    maps = raw_maps()
    expected = canvas_reference(maps, size, geometry)
    np.testing.assert_allclose(to_size(maps, size, geometry).numpy(), expected, atol=2e-6 * 40)
    shaped = shape_heatmaps(maps, geometry, "explicit", size, normalised=False)
    np.testing.assert_allclose(shaped, expected, atol=2e-6 * 40)


def test_input_resolution_is_pytorch_grad_cams_output() -> None:
    """pytorch-grad-cam scales each layer's ReLU'd map with `scale_cam_image` (normalise, then
    cv2.resize to the input), averages the layers and scales again: for one layer, these."""
    raw = raw_maps()
    expected = scale_cam_image(scale_cam_image(np.maximum(raw.numpy(), 0), (224, 224)))
    ours = shape_heatmaps(raw, LANDSCAPE, "input")
    assert ours.dtype == np.float32
    assert ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert ours.min() == 0.0
    assert ours.max() == 1.0


@pytest.mark.parametrize(("geometry", "size"), GEOMETRIES)
def test_original_and_explicit_are_the_input_values_resampled(
    geometry: Geometry, size: tuple[int, int]
) -> None:
    """Normalised once, over the model input, then mapped: the minimum inside the crop is
    subtracted and nothing is stretched again over the larger image. (The tolerance is float32
    sample positions, as F.interpolate computes them, next to the crop's sharp edge.)"""
    raw = raw_maps()
    at_input = shape_heatmaps(raw, geometry, "input").astype(np.float64)
    expected = onto_original_float64(at_input, geometry, size)
    explicit = shape_heatmaps(raw, geometry, "explicit", size)
    np.testing.assert_allclose(explicit, expected, atol=1e-4)
    if size == geometry.original_hw:
        np.testing.assert_allclose(shape_heatmaps(raw, geometry, "original"), expected, atol=1e-4)


def test_the_same_map_gives_the_same_values_inside_the_crop_at_every_resolution() -> None:
    """The crop of an image resized by exactly 1 (a 256x341 image, resized to 256): the original
    holds the input values unchanged inside the crop box, zeros around it."""
    geometry = Geometry(original_hw=(256, 341), resized_hw=(256, 341), crop_box=(16, 58, 224, 224))
    raw = raw_maps()
    at_input = shape_heatmaps(raw, geometry, "input")
    original = shape_heatmaps(raw, geometry, "original")
    np.testing.assert_array_equal(original[:, 16:240, 58:282], at_input)
    assert not original[:, :16].any()
    assert not original[:, 240:].any()
    assert not original[:, :, :58].any()
    assert not original[:, :, 282:].any()
    assert float(original.max()) == 1.0
    assert float(original[:, 16:240, 58:282].min()) == 0.0


def test_feature_resolution_is_normalised_over_the_feature_map() -> None:
    raw = raw_maps()
    np.testing.assert_array_equal(shape_heatmaps(raw, LANDSCAPE, "feature"), normalise(raw))
    unnormalised = shape_heatmaps(raw, LANDSCAPE, "feature", normalised=False)
    np.testing.assert_array_equal(unnormalised, raw.numpy())


@pytest.mark.parametrize("resolution", ["feature", "input", "original", "explicit"])
def test_output_dtypes_are_the_float32_values_converted(resolution: str) -> None:
    raw = raw_maps()
    size = (123, 77) if resolution == "explicit" else None
    values = shape_heatmaps(raw, LANDSCAPE, resolution, size)
    as_uint8 = shape_heatmaps(raw, LANDSCAPE, resolution, size, dtype="uint8")
    as_float16 = shape_heatmaps(raw, LANDSCAPE, resolution, size, dtype="float16")
    assert as_uint8.dtype == np.uint8
    assert as_float16.dtype == np.float16
    rounded = np.clip(np.rint(values * 255.0), 0, 255)
    # Equal, but for values within float rounding of a half step, which may round either way.
    assert np.abs(as_uint8.astype(np.int16) - rounded).max() <= 1
    assert np.mean(as_uint8 == rounded) > 0.999
    np.testing.assert_allclose(as_float16.astype(np.float32), values, atol=1e-3)


def test_a_huge_resized_image_is_never_materialised() -> None:
    """An 8x4000 image resized to a shorter side of 256 is 256x128000: the former mapping
    allocated that canvas (125 MiB per map) to draw an 8x4000 heatmap."""
    geometry = Geometry(
        original_hw=(8, 4000), resized_hw=(256, 128000), crop_box=(16, 63888, 224, 224)
    )
    raw = raw_maps(count=2)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        shaped = shape_heatmaps(raw, geometry, "original", dtype="uint8")
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert largest < 2**20, f"one allocation took {largest} bytes"
    assert shaped.shape == (2, 8, 4000)
    # The crop covers original columns 63888/32 .. 64112/32 = 1996.5 .. 2003.5.
    assert not shaped[:, :, :1995].any()
    assert not shaped[:, :, 2005:].any()
    assert shaped[:, :, 1997:2003].all()
    bound = output_bytes(geometry, "original", None, "uint8", 2, (7, 7))
    assert bound < 4 * 2**20  # the canvas alone was 2 x 125 MiB


def torch_peak_bytes(call: Callable[[], object]) -> int:
    """The most memory torch held at once during `call`, from the profiler: each operation's own
    allocations at its start, each free at its time."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        call()
    changes = sorted(
        (
            event.time_range.start,
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage,
        )
        for event in prof.events()
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize(
    ("geometry", "resolution", "size", "dtype", "count"),
    [
        (LANDSCAPE, "original", None, "float32", 2),
        (LANDSCAPE, "original", None, "uint8", 40),
        (LANDSCAPE, "input", None, "float16", 40),
        (LANDSCAPE, "feature", None, "float32", 3),
        (LANDSCAPE, "explicit", (1500, 2000), "float32", 3),
        # 400x8000 (20:1), resized to 256x5120: wider than one group of rows at once.
        (
            Geometry(
                original_hw=(400, 8000), resized_hw=(256, 5120), crop_box=(16, 2448, 224, 224)
            ),
            "original",
            None,
            "float16",
            5,
        ),
    ],
)
def test_output_bytes_bounds_what_shaping_and_encoding_allocate(
    geometry: Geometry, resolution: str, size: tuple[int, int] | None, dtype: str, count: int
) -> None:
    """The bound covers the heatmaps, their wire copies and torch's peak while shaping them."""
    raw = raw_maps(count)
    shaped: list[np.ndarray] = []
    peak = torch_peak_bytes(
        lambda: shaped.append(shape_heatmaps(raw, geometry, resolution, size, dtype=dtype))
    )
    (heatmaps,) = shaped
    wire = sum(len(to_proto(heatmap).data) for heatmap in heatmaps)
    assert wire == heatmaps.nbytes
    measured = peak + heatmaps.nbytes + wire
    bound = output_bytes(geometry, resolution, size, dtype, count, (7, 7))
    assert measured <= bound
    assert bound <= 3 * measured + 32 * 2**20  # not a vacuous bound


def test_output_bytes_grows_with_the_output_never_with_the_resized_image() -> None:
    bound = output_bytes(LANDSCAPE, "original", None, "float32", 2, (7, 7))
    wide = Geometry(original_hw=(300, 400), resized_hw=(256, 99999), crop_box=(16, 58, 224, 224))
    assert output_bytes(wide, "original", None, "float32", 2, (7, 7)) <= bound
    assert output_bytes(LANDSCAPE, "explicit", (600, 800), "float32", 2, (7, 7)) > bound
    assert output_bytes(LANDSCAPE, "original", None, "float32", 4, (7, 7)) > bound
    feature = output_bytes(LANDSCAPE, "feature", None, "uint8", 2, (7, 7))
    assert feature == 2 * 2 * 49 + 5 * 2 * 49 * 4  # the maps twice; raw maps and normalising
    with_overlay = output_bytes(LANDSCAPE, "feature", None, "uint8", 2, (7, 7), overlay=True)
    assert with_overlay - feature > 300 * 400 * 16  # rendering at the original size


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: shape_heatmaps(raw_maps(), LANDSCAPE, "pixels"), "resolution='pixels'"),
        (lambda: shape_heatmaps(raw_maps(), LANDSCAPE, "explicit"), "needs size"),
        (lambda: shape_heatmaps(raw_maps(), LANDSCAPE, "explicit", (0, 4)), "size"),
        (lambda: shape_heatmaps(raw_maps(), LANDSCAPE, "input", dtype="int8"), "dtype='int8'"),
        (
            lambda: shape_heatmaps(raw_maps(), LANDSCAPE, "input", normalised=False, dtype="uint8"),
            "normalised maps only",
        ),
        (lambda: output_bytes(LANDSCAPE, "input", None, "float64", 1, (7, 7)), "dtype"),
    ],
)
def test_bad_shaping_arguments_are_refused(call: Callable[[], object], match: str) -> None:
    with pytest.raises(EngineError, match=match):
        call()
