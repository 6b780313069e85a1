"""`camserve compare`: every method on the same images, side by side, with faithfulness scores.

Each (image, method) pair is its own request, so a method the server refuses (ScoreCAM over a
small model's queue, a method a layer cannot take) costs only its own cell: it is reported with
the server's message and the other methods go on. Scores are averaged over the images a method
explained; the panel shows each image with one overlay per method, captioned with its scores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont, ImageOps

from camserve.client.errors import CamserveError
from camserve.client.requests import SCORE_ALIASES
from camserve.client.results import Explanation
from camserve.v1.render import blend
from camserve.v1.scores import HIGHER_IS_BETTER

CELL = 160  # each picture is fitted into a CELL x CELL box
MARGIN = 8
LINE = 14  # caption line height in pixels
METHOD_WIDTH = 20  # table column of method names ("gradcamelementwise" is 18)
SHORT_NAMES = {full: short for short, full in SCORE_ALIASES.items()}  # captions: "deletion 0.12"

Explain = Callable[..., Explanation]  # Client.explain, or a stand-in
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class Picture:
    """An image as a viewer shows it (EXIF orientation applied, as the server maps heatmaps onto
    the upright original), and its thumbnail size (height, width) within the panel's cell."""

    path: Path
    image: PILImage.Image
    thumbnail_hw: tuple[int, int]


@dataclass(frozen=True)
class Attempt:
    """One image explained with one method: its explanation, or why the server refused it."""

    explanation: Explanation | None
    error: CamserveError | None
    seconds: float

    def score(self, name: str) -> float | None:
        """The score of the image's (only) heatmap, None when not computed or refused."""
        if self.explanation is None:
            return None
        key = next(iter(self.explanation.heatmaps), None)
        return self.explanation.scores.get(key, {}).get(name) if key is not None else None


@dataclass(frozen=True)
class MethodResult:
    """A method's attempts, one per image in order."""

    method: str
    attempts: tuple[Attempt, ...]

    @property
    def failures(self) -> list[CamserveError]:
        return [a.error for a in self.attempts if a.error is not None]

    @property
    def refused(self) -> bool:
        """True when no image could be explained with this method."""
        return len(self.failures) == len(self.attempts)

    def mean_score(self, name: str) -> float | None:
        values = [v for a in self.attempts if (v := a.score(name)) is not None]
        return statistics.fmean(values) if values else None

    def mean_seconds(self) -> float | None:
        times = [a.seconds for a in self.attempts if a.explanation is not None]
        return statistics.fmean(times) if times else None


def load_picture(path: Path) -> Picture:
    """The upright picture and the size its heatmaps are asked for (fitted to the cell)."""
    with PILImage.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = CELL / max(image.size)
    width, height = (max(1, round(side * scale)) for side in image.size)
    return Picture(path, image, (height, width))


def run(
    explain: Explain,
    pictures: Sequence[Picture],
    methods: Sequence[str],
    **options: object,
) -> list[MethodResult]:
    """Explains every picture with every method, one request each; refusals are kept, not
    raised. `options` go to every call (scores, score_steps, model, layer, ...)."""
    results = []
    for method in methods:
        attempts = [_attempt(explain, picture, method, options) for picture in pictures]
        results.append(MethodResult(method, tuple(attempts)))
    return results


def _attempt(
    explain: Explain, picture: Picture, method: str, options: dict[str, object]
) -> Attempt:
    started = time.perf_counter()
    try:
        explanation = explain(
            picture.path,
            methods=method,
            resolution=picture.thumbnail_hw,  # the map over the whole image, at thumbnail size
            dtype="uint8",
            top_predictions=1,
            **options,
        )
    except CamserveError as exc:
        return Attempt(None, exc, time.perf_counter() - started)
    return Attempt(explanation, None, time.perf_counter() - started)


def best_methods(results: Sequence[MethodResult], scores: Sequence[str]) -> dict[str, str]:
    """Per score, the method whose mean is the most faithful (see HIGHER_IS_BETTER)."""
    best: dict[str, str] = {}
    for name in scores:
        means = {r.method: m for r in results if (m := r.mean_score(name)) is not None}
        if means:
            pick = max if HIGHER_IS_BETTER[name] else min
            best[name] = pick(means, key=lambda method: means[method])
    return best


def table(results: Sequence[MethodResult], scores: Sequence[str]) -> list[str]:
    """The method x score table (means over the images), seconds per image, and the best
    method per score; a refused method's row carries the server's message instead."""
    widths = [max(len(name), 10) for name in scores]
    header = [f"{'method':<{METHOD_WIDTH}}"]
    header += [f"{name:>{width}}" for name, width in zip(scores, widths, strict=True)]
    lines = ["  ".join([*header, f"{'s/image':>8}"])]
    for result in results:
        lines.extend(_rows(result, scores, widths))
    for name, method in best_methods(results, scores).items():
        mean = next(r for r in results if r.method == method).mean_score(name)
        direction = "higher" if HIGHER_IS_BETTER[name] else "lower"
        lines.append(f"best {name}: {method} ({mean:.4f}; {direction} is better)")
    return lines


def _rows(result: MethodResult, scores: Sequence[str], widths: Sequence[int]) -> list[str]:
    failures = result.failures
    if result.refused:
        return [f"{result.method:<{METHOD_WIDTH}}  refused: {failures[0]}"]
    cells = [f"{result.method:<{METHOD_WIDTH}}"]
    for name, width in zip(scores, widths, strict=True):
        mean = result.mean_score(name)
        cells.append(f"{'-' if mean is None else f'{mean:.4f}':>{width}}")
    cells.append(f"{result.mean_seconds() or 0.0:>8.3f}")
    rows = ["  ".join(cells)]
    if failures:
        count = len(result.attempts)
        rows.append(f"  {len(failures)} of {count} images failed: {failures[0]}")
    return rows


def panel_size(images: int, methods: int, scores: int) -> tuple[int, int]:
    """(width, height) of the panel: a row per image, the image then one cell per method, each
    cell captioned with a title line and a line per score."""
    width = MARGIN + (1 + methods) * (CELL + MARGIN)
    height = MARGIN + images * (CELL + (1 + scores) * LINE + MARGIN)
    return width, height


def panel(
    pictures: Sequence[Picture],
    results: Sequence[MethodResult],
    scores: Sequence[str],
    *,
    colormap: str = "jet",
    alpha: float = 0.4,
) -> PILImage.Image:
    """Per image a row: the image, then each method's overlay captioned with its scores."""
    figure = PILImage.new("RGB", panel_size(len(pictures), len(results), len(scores)), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    lines = 1 + len(scores)
    row_height = CELL + lines * LINE + MARGIN
    for row, picture in enumerate(pictures):
        top = MARGIN + row * row_height
        thumbnail = picture.image.resize(picture.thumbnail_hw[::-1], PILImage.Resampling.BILINEAR)
        _paste(figure, thumbnail, MARGIN, top)
        _caption(draw, font, MARGIN, top, _image_caption(picture, results, row), lines)
        for column, result in enumerate(results, start=1):
            left = MARGIN + column * (CELL + MARGIN)
            attempt = result.attempts[row]
            if attempt.explanation is None:
                draw.rectangle([left, top, left + CELL - 1, top + CELL - 1], fill="lightgrey")
            else:
                heatmap = attempt.explanation.heatmap(result.method)
                _paste(figure, blend(thumbnail, heatmap, colormap, alpha), left, top)
            _caption(draw, font, left, top, _method_caption(result.method, attempt, scores), lines)
    return figure


def _paste(figure: PILImage.Image, picture: PILImage.Image, left: int, top: int) -> None:
    """Centred in its CELL x CELL box."""
    offset = ((CELL - picture.width) // 2, (CELL - picture.height) // 2)
    figure.paste(picture, (left + offset[0], top + offset[1]))


def _caption(
    draw: ImageDraw.ImageDraw, font: Font, left: int, top: int, lines: list[str], count: int
) -> None:
    """At most `count` lines under the cell at (left, top): the room the panel has for them."""
    for i, line in enumerate(lines[:count]):
        draw.text((left, top + CELL + 1 + i * LINE), line, fill="black", font=font)


def _image_caption(picture: Picture, results: Sequence[MethodResult], row: int) -> list[str]:
    lines = [picture.path.name]
    for result in results:
        explanation = result.attempts[row].explanation
        if explanation is not None:
            top = explanation.top
            lines.append(f"{top.index} {top.label} {top.probability:.2f}")
            break
    return lines


def _method_caption(method: str, attempt: Attempt, scores: Sequence[str]) -> list[str]:
    if attempt.error is not None:
        return [f"{method} (refused)", attempt.error.code.name]
    lines = [method]
    for name in scores:
        value = attempt.score(name)
        lines.append(f"{SHORT_NAMES.get(name, name)} {'-' if value is None else f'{value:.3f}'}")
    return lines
