"""Figures of a model's insides for the SDK and the CLI: feature-map grids with channel
numbers, and bar charts of channel-attention weights. numpy and Pillow only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from camserve.v1.render import normalise

TITLE_HEIGHT = 22
LABEL_HEIGHT = 14
MARGIN = 6


def feature_grid(
    maps: np.ndarray,
    channels: Sequence[int],
    *,
    title: str = "",
    columns: int = 0,
    cell: int = 96,
) -> PILImage.Image:
    """One grayscale image per channel of `maps` (k, H, W), each min-max normalised on its own
    and labelled with its channel number, `columns` per row (0: a square grid)."""
    if maps.ndim != 3 or len(maps) != len(channels) or not len(channels):
        raise ValueError(
            f"maps must be (k, H, W) with one channel number each, got {maps.shape} and "
            f"{len(channels)} numbers"
        )
    columns = columns or math.ceil(math.sqrt(len(channels)))
    rows = math.ceil(len(channels) / columns)
    height, width = maps.shape[1:]
    scale = cell / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    step_x, step_y = size[0] + MARGIN, size[1] + LABEL_HEIGHT + MARGIN
    figure = PILImage.new(
        "RGB", (MARGIN + columns * step_x, TITLE_HEIGHT + MARGIN + rows * step_y), "white"
    )
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    draw.text((MARGIN, 4), title, fill="black", font=font)
    for index, (channel, values) in enumerate(zip(channels, maps, strict=True)):
        x = MARGIN + (index % columns) * step_x
        y = TITLE_HEIGHT + (index // columns) * step_y
        draw.text((x, y), f"#{channel}", fill="black", font=font)
        pixels = np.round(normalise(values.astype(np.float32)) * 255).astype(np.uint8)
        tile = PILImage.fromarray(pixels).resize(size, PILImage.Resampling.NEAREST)
        figure.paste(tile.convert("RGB"), (x, y + LABEL_HEIGHT))
    return figure


def gate_bars(
    weights: np.ndarray, *, title: str = "", height: int = 160, bar_width: int = 3
) -> PILImage.Image:
    """A bar chart of a channel gate's weights (C,) in [0, 1], channel 0 on the left, with the
    axis marked at 0, 0.5 and 1."""
    if weights.ndim != 1 or not len(weights):
        raise ValueError(f"weights must be (C,), got shape {weights.shape}")
    values = np.clip(weights.astype(np.float64), 0.0, 1.0)
    left = 28
    width = left + len(values) * bar_width + MARGIN
    figure = PILImage.new("RGB", (max(width, 200), TITLE_HEIGHT + height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    draw.text((MARGIN, 4), title, fill="black", font=font)
    base = TITLE_HEIGHT + height
    for mark in (0.0, 0.5, 1.0):
        y = base - round(mark * height)
        draw.line([(left - 3, y), (width - MARGIN, y)], fill=(210, 210, 210))
        draw.text((2, y - 6), f"{mark:g}", fill="black", font=font)
    for channel, value in enumerate(values):
        x = left + channel * bar_width
        top = base - round(value * height)
        draw.rectangle([x, top, x + max(bar_width - 2, 0), base], fill=(31, 119, 180))
    draw.text((left, base + 2), f"channel 0 to {len(values) - 1}", fill="black", font=font)
    return figure
