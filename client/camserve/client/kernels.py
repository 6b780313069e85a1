"""Convolution kernels (GetKernels): the request the SDK sends and the result it returns."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import from_proto


@dataclass(frozen=True)
class ConvLayerInfo:
    """A Conv2d of a model: its weight's shape (out, in / groups, kh, kw) and groups."""

    name: str
    weight_shape: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class Kernels:
    """A conv layer's weights and one page of their grid.

    `weights`: float32 (out, in / groups, kh, kw), or None when not asked for. `grid_png`: the
    page's PNG (empty when not asked for); tiles are whole RGB filters when `colour`, else one
    grayscale tile per (filter, input channel), each filter min-max normalised. Filters
    `first_filter` up to `end_filter` are on this page, in `rows` x `columns` tiles.
    """

    model: str
    model_version: str
    layer: str
    weights: np.ndarray | None
    grid_png: bytes
    colour: bool
    page: int
    pages: int
    first_filter: int
    end_filter: int
    columns: int
    rows: int
    tiles: int

    def image(self) -> PILImage.Image:
        """The grid page as a PIL image."""
        return PILImage.open(io.BytesIO(self._png()))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the grid page's PNG to `path`."""
        with open(path, "wb") as out:
            out.write(self._png())

    def _png(self) -> bytes:
        if not self.grid_png:
            raise ValueError("this result has no grid: ask for it (grid=True)")
        return self.grid_png


def kernels_request(
    layer: str,
    model: str,
    *,
    weights: bool,
    grid: bool,
    page: int,
    tiles_per_page: int,
    tile_size: int,
) -> pb.GetKernelsRequest:
    """The GetKernels request; checks what the server would refuse anyway, earlier."""
    if not (weights or grid):
        raise ValueError("weights=False and grid=False leave nothing to ask for")
    for name, value in (
        ("page", page),
        ("tiles_per_page", tiles_per_page),
        ("tile_size", tile_size),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return pb.GetKernelsRequest(
        model=model,
        layer=layer,
        skip_weights=not weights,
        skip_grid=not grid,
        page=page,
        tiles_per_page=tiles_per_page,
        tile_size=tile_size,
    )


def kernels_from_proto(response: pb.GetKernelsResponse) -> Kernels:
    return Kernels(
        model=response.model,
        model_version=response.model_version,
        layer=response.layer,
        weights=from_proto(response.weights, "weights") if response.HasField("weights") else None,
        grid_png=response.grid_png,
        colour=response.colour,
        page=response.page,
        pages=response.pages,
        first_filter=response.first_filter,
        end_filter=response.end_filter,
        columns=response.columns,
        rows=response.rows,
        tiles=response.tiles,
    )
