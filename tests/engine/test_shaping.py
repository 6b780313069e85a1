"""Feature maps to pixels and to [0, 1]: pure tensor functions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from camserve.server.engine import EngineError, Geometry, normalise, to_input, to_original, to_size


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
