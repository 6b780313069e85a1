"""Layout detection from output shapes, and the views that turn layouts into (N, C, h, w) maps."""

from __future__ import annotations

import pytest
import torch

from camserve.server.engine.layouts import (
    NCHW,
    NHWC,
    TOKENS,
    Detector,
    Layout,
    LayoutHints,
    Refused,
    tiles,
)


@pytest.mark.parametrize(
    ("grid", "input_hw", "expected"),
    [
        ((7, 7), (224, 224), True),  # stride 32
        ((56, 56), (224, 224), True),
        ((7, 14), (224, 448), True),
        ((8, 10), (225, 300), True),  # stride ~28-30, sides rounded up
        ((1, 1), (224, 224), True),
        ((7, 768), (224, 224), False),  # an NHWC map read as NCHW
        ((64, 56), (224, 224), False),  # strides 3.5 and 4 cannot be one stride
        ((197, 64), (224, 224), False),  # attention's (heads, tokens, head_dim)
        ((7, 7), (64, 128), False),  # VGG's fixed 7x7 pool on a wide input
    ],
)
def test_a_grid_tiles_the_input_with_one_stride(
    grid: tuple[int, int], input_hw: tuple[int, int], expected: bool
) -> None:
    assert tiles(grid, input_hw) is expected


def test_maps_are_views_with_the_prefix_dropped() -> None:
    tokens = torch.arange(2 * (3 + 6) * 4, dtype=torch.float32).reshape(2, 9, 4)
    layout = Layout(TOKENS, channels=4, grid=(2, 3), prefix=3)
    maps = layout.to_maps(tokens)
    assert maps.shape == (2, 4, 2, 3)
    assert maps.data_ptr() == tokens[:, 3:].data_ptr()  # a view, no copy
    # Row-major patches: token 3 + (y * 3 + x) holds position (y, x).
    for y in range(2):
        for x in range(3):
            torch.testing.assert_close(maps[:, :, y, x], tokens[:, 3 + y * 3 + x, :])
    # Leading dimensions (classes x images, as gradients have) pass through.
    stacked = layout.to_maps(torch.stack([tokens, -tokens]))
    assert stacked.shape == (2, 2, 4, 2, 3)
    torch.testing.assert_close(stacked[1], -maps)

    nhwc = torch.randn(2, 5, 6, 8)
    as_maps = Layout(NHWC, channels=8, grid=(5, 6)).to_maps(nhwc)
    torch.testing.assert_close(as_maps, nhwc.permute(0, 3, 1, 2))
    assert Layout(NHWC, 8, (5, 6)).item_shape == (5, 6, 8)
    assert Layout(TOKENS, 4, (2, 3), prefix=3).item_shape == (9, 4)


def test_detection_from_shapes() -> None:
    detector = Detector(batch=2, input_hw=(224, 224), hints=LayoutHints())
    assert detector.feed("conv", (2, 768, 14, 14)) == Layout(NCHW, 768, (14, 14))
    # The patch embedding's grid, then one class token: P = 197 - 14 * 14.
    assert detector.feed("block", (2, 197, 768)) == Layout(TOKENS, 768, (14, 14), prefix=1)
    assert detector.feed("mlp", (2, 197, 3072)) == Layout(TOKENS, 3072, (14, 14), prefix=1)
    assert detector.feed("stage", (2, 7, 7, 768)) == Layout(NHWC, 768, (7, 7))
    assert detector.feed("stage.mlp", (2, 49, 768)) == Layout(TOKENS, 768, (7, 7), prefix=0)
    assert detector.feed("logits", (2, 1000)) is None
    assert detector.feed("windows", (128, 49, 96)) is None  # not one entry per image
    assert detector.feed("tuple", None) is None


def test_declared_prefix_and_patch_size_decide() -> None:
    hints = LayoutHints(prefix_tokens=2, patch_size=(16, 16))
    detector = Detector(batch=2, input_hw=(224, 224), hints=hints)
    assert detector.feed("pos_drop", (2, 198, 192)) == Layout(TOKENS, 192, (14, 14), prefix=2)
    assert detector.feed("patch_embed", (2, 196, 192)) == Layout(TOKENS, 192, (14, 14), prefix=0)
    refused = detector.feed("other", (2, 199, 192))
    assert isinstance(refused, Refused)
    assert "199 tokens of width 192" in refused.reason
    assert "2 (or 0) prefix tokens" in refused.reason
    assert "tried 14x14 from the patch size" in refused.reason


def test_ambiguous_maps_follow_the_model_and_the_overrides() -> None:
    shape = (2, 8, 8, 8)
    assert Detector(2, (32, 32), LayoutHints()).feed("x", shape) == Layout(NCHW, 8, (8, 8))
    nhwc_model = LayoutHints(nhwc=True)
    assert Detector(2, (32, 32), nhwc_model).feed("x", shape) == Layout(NHWC, 8, (8, 8))
    override = LayoutHints(layers={"x": NCHW}, nhwc=True)
    assert Detector(2, (32, 32), override).feed("x", shape) == Layout(NCHW, 8, (8, 8))
    wrong = Detector(2, (32, 32), LayoutHints(layers={"x": TOKENS})).feed("x", shape)
    assert isinstance(wrong, Refused)
    assert "configured as 'tokens'" in wrong.reason


def test_configured_hints_win_over_declared_ones() -> None:
    declared = LayoutHints(prefix_tokens=1, patch_size=(16, 16), layers={"a": NHWC})
    configured = LayoutHints(prefix_tokens=5, layers={"b": TOKENS})
    merged = configured.over(declared)
    assert merged.prefix_tokens == 5
    assert merged.patch_size == (16, 16)
    assert dict(merged.layers) == {"a": NHWC, "b": TOKENS}
    assert LayoutHints(prefix_tokens=0).over(declared).prefix_tokens == 0
