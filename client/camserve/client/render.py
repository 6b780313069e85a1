"""Overlays and comparison panels for the SDK and the CLI, with numpy and Pillow only.

The colormaps and the blending are shared with the server (`camserve.v1.render`), so an overlay
drawn here looks like one the server returns.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from camserve.client.images import ImageInput, to_pil
from camserve.client.results import Explanation
from camserve.v1.render import COLORMAPS, blend, colorize, colormap, normalise

__all__ = ["COLORMAPS", "colorize", "colormap", "normalise", "overlay", "panel"]


def overlay(
    image: ImageInput, heatmap: np.ndarray, colormap: str = "jet", alpha: float = 0.4
) -> PILImage.Image:
    """The image with the coloured heatmap blended over it, at the image's own size."""
    return blend(to_pil(image), heatmap, colormap, alpha)


def panel(
    image: ImageInput,
    explanation: Explanation,
    *,
    colormap: str = "jet",
    alpha: float = 0.4,
    cell_height: int = 224,
) -> PILImage.Image:
    """One row per heatmap (method, class): the image, the heatmap, and the overlay, titled."""
    if not explanation.heatmaps:
        raise ValueError("the explanation has no heatmaps to draw")
    picture = to_pil(image)
    width = max(1, round(picture.width * cell_height / picture.height))
    cell = (width, cell_height)
    shown = picture.resize(cell, PILImage.Resampling.BILINEAR)
    font = ImageFont.load_default()
    title_height = 20
    margin = 8
    rows = list(explanation.heatmaps.items())
    figure = PILImage.new(
        "RGB",
        (3 * width + 4 * margin, len(rows) * (cell_height + title_height + margin) + margin),
        "white",
    )
    draw = ImageDraw.Draw(figure)
    for row, ((method, class_index), heatmap) in enumerate(rows):
        top = margin + row * (cell_height + title_height + margin)
        label = explanation.class_labels.get(class_index, "")
        draw.text(
            (margin, top + 4),
            f"{method} @ {explanation.layer}: {class_index} {label}".rstrip(),
            fill="black",
            font=font,
        )
        cells = (
            shown,
            colorize(heatmap, colormap, size=cell),
            overlay(shown, heatmap, colormap, alpha),
        )
        for column, content in enumerate(cells):
            figure.paste(content, (margin + column * (width + margin), top + title_height))
    return figure
