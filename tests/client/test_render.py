"""Colormaps, overlays and panels with numpy and Pillow only."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

from camserve.client.render import COLORMAPS, colorize, colormap, normalise, overlay, panel
from camserve.client.results import Explanation, Prediction, Timing
from tests._support.servers import CAT_JPEG


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormaps_are_256_rgb_entries(name) -> None:
    table = colormap(name)
    assert table.shape == (256, 3)
    assert table.dtype == np.uint8
    assert not table.flags.writeable


@pytest.mark.parametrize(
    ("name", "tolerance"), [("viridis", 8), ("inferno", 8), ("turbo", 8), ("jet", 40)]
)
def test_colormaps_follow_the_published_maps(name, tolerance) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.round(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(colormap(name).astype(float) - reference).max() <= tolerance


def test_jet_runs_from_dark_blue_to_dark_red() -> None:
    table = colormap("jet")
    assert tuple(table[0]) == (0, 0, 128)
    assert tuple(table[-1]) == (128, 0, 0)
    assert table[128, 1] == 255  # full green in the middle


def test_unknown_colormap_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of"):
        colormap("rainbow")


def test_normalise_scales_to_unit_range() -> None:
    np.testing.assert_allclose(
        normalise(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1]]
    )
    np.testing.assert_allclose(normalise(np.array([[0, 255]], np.uint8)), [[0, 1]])
    assert not normalise(np.full((2, 2), 3.0)).any()  # flat: no signal
    with pytest.raises(ValueError, match="2-D"):
        normalise(np.zeros((1, 2, 3)))


def test_colorize_resizes_to_the_requested_size() -> None:
    picture = colorize(np.eye(4, dtype=np.float32), "viridis", size=(10, 6))
    assert picture.size == (10, 6)
    assert picture.mode == "RGB"


def test_overlay_keeps_the_original_size_and_blends() -> None:
    cat = Image.open(CAT_JPEG).convert("RGB")
    heat = np.zeros((7, 7), np.float32)
    heat[3, 3] = 1.0
    blended = overlay(CAT_JPEG, heat)
    assert blended.size == cat.size
    assert blended.mode == "RGB"
    expected = (1 - 0.4) * np.asarray(cat, float) + 0.4 * np.asarray(
        colorize(heat, "jet", size=cat.size), float
    )
    assert np.abs(np.asarray(blended, float) - expected).max() <= 1.0
    assert np.array_equal(np.asarray(overlay(cat, heat, alpha=0.0)), np.asarray(cat))
    with pytest.raises(ValueError, match="alpha"):
        overlay(cat, heat, alpha=2)


def explanation(keys) -> Explanation:
    heat = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    return Explanation(
        predictions=(Prediction(index=285, label="Egyptian cat", probability=0.4, logit=9.0),),
        heatmaps=MappingProxyType(dict.fromkeys(keys, heat)),
        class_labels=MappingProxyType({285: "Egyptian cat", 281: "tabby"}),
        layer="head",
        overlay=None,
        timing=Timing(0, 0, 0, 0),
        batch_size=1,
        model="m",
        model_version="1",
        request_id="r",
    )


def test_panel_has_one_row_of_three_per_heatmap() -> None:
    one = panel(CAT_JPEG, explanation([("gradcam", 285)]), cell_height=100)
    three = panel(
        CAT_JPEG,
        explanation([("gradcam", 285), ("layercam", 285), ("gradcam", 281)]),
        cell_height=100,
    )
    cell_width = round(451 * 100 / 300)
    assert one.width == three.width == 3 * cell_width + 4 * 8
    assert three.height - 8 == 3 * (one.height - 8)
    with pytest.raises(ValueError, match="no heatmaps"):
        panel(CAT_JPEG, explanation([]))
