"""A convolution layer's weights drawn as a grid of small images, one page at a time.

Torch-free: it works on the float32 weight array (out, in / groups, kh, kw). Tiles are whole
filters in colour when the layer reads the image's three channels, otherwise one grayscale tile
per (filter, input channel), filter-major, each filter's row(s) of channel tiles together (a
depthwise conv's filters, one channel each, in a square grid like colour filters). Every
filter is min-max normalised over all its own weights, so each shows its own pattern whatever its
scale. A layer with more tiles than a page holds is paged; pages hold whole filters when they fit.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_COLUMNS = 64  # grayscale tiles per row: a filter with more input channels wraps
GAP = 1  # background pixels between tiles
BACKGROUND = 40  # dark grey, apart from both ends of the normalised range


@dataclass(frozen=True)
class GridLayout:
    """How a layer's tiles are paged: `per_filter` tiles per filter, `tiles_per_page` per page;
    a block of `block` consecutive tiles starts a new row (a filter, or the whole page)."""

    colour: bool
    filters: int
    per_filter: int
    tiles_per_page: int
    block: int
    columns: int

    @property
    def tiles(self) -> int:
        return self.filters * self.per_filter

    @property
    def pages(self) -> int:
        return math.ceil(self.tiles / self.tiles_per_page)


@dataclass(frozen=True)
class GridPage:
    """One rendered page of a layer's grid and where it sits in the whole."""

    png: bytes
    page: int
    pages: int
    first_filter: int
    end_filter: int
    columns: int
    rows: int
    tiles: int


def layout(shape: tuple[int, ...], colour: bool, tiles_per_page: int) -> GridLayout:
    """The paging of a weight of `shape` (out, in / groups, kh, kw) at most `tiles_per_page`
    tiles a page; `colour` draws each filter as one RGB tile (its input must be 3 channels)."""
    filters, per_filter = shape[0], 1 if colour else shape[1]
    if per_filter == 1:  # colour filters, or a depthwise conv's: one tile each, a square grid
        page = min(tiles_per_page, filters)
        return GridLayout(colour, filters, 1, page, page, math.ceil(math.sqrt(page)))
    if per_filter > tiles_per_page:  # pages of one filter's channels
        return GridLayout(colour, filters, per_filter, tiles_per_page, tiles_per_page, MAX_COLUMNS)
    whole = (tiles_per_page // per_filter) * per_filter  # whole filters only
    columns = min(per_filter, MAX_COLUMNS)
    return GridLayout(colour, filters, per_filter, whole, per_filter, columns)


def _normalised_filters(weights: np.ndarray) -> np.ndarray:
    """Each filter scaled to [0, 1] over all its weights; a constant filter becomes 0.5."""
    flat = weights.reshape(weights.shape[0], -1).astype(np.float64)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.5)
    return scaled.reshape(weights.shape)


def _tiles(weights: np.ndarray, grid: GridLayout, start: int, end: int) -> np.ndarray:
    """Tiles `start:end` (flat, filter-major) as uint8 (n, kh, kw) or (n, kh, kw, 3)."""
    first, last = start // grid.per_filter, (end - 1) // grid.per_filter + 1
    scaled = _normalised_filters(weights[first:last])
    if grid.colour:
        tiles = scaled.transpose(0, 2, 3, 1)  # (filters, kh, kw, RGB)
    else:
        tiles = scaled.reshape(-1, *weights.shape[2:])[start - first * grid.per_filter :]
        tiles = tiles[: end - start]
    return np.round(tiles * 255).astype(np.uint8)


def render_page(weights: np.ndarray, grid: GridLayout, page: int, tile_size: int) -> GridPage:
    """Page `page` of the grid of `weights`, each tile scaled up by whole pixels to at most
    `tile_size` on its longer side (at least one pixel per weight)."""
    start = page * grid.tiles_per_page
    end = min(start + grid.tiles_per_page, grid.tiles)
    tiles = _tiles(weights, grid, start, end)
    kh, kw = weights.shape[2:]
    scale = max(1, tile_size // max(kh, kw))
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    rows_per_block = math.ceil(grid.block / grid.columns)
    local = np.arange(end - start)
    block, within = local // grid.block, local % grid.block
    rows = block * rows_per_block + within // grid.columns
    cols = within % grid.columns
    row_count = int(rows.max()) + 1
    height, width = kh * scale + GAP, kw * scale + GAP
    canvas = np.full(
        (row_count * height + GAP, grid.columns * width + GAP, *tiles.shape[3:]),
        BACKGROUND,
        dtype=np.uint8,
    )
    for tile, row, col in zip(tiles, rows.tolist(), cols.tolist(), strict=True):
        y, x = GAP + row * height, GAP + col * width
        canvas[y : y + kh * scale, x : x + kw * scale] = tile
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return GridPage(
        png=buffer.getvalue(),
        page=page,
        pages=grid.pages,
        first_filter=start // grid.per_filter,
        end_filter=(end - 1) // grid.per_filter + 1,
        columns=grid.columns,
        rows=row_count,
        tiles=end - start,
    )
