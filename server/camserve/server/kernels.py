"""GetKernels: a convolution layer's weights and their grid, checked, rendered and cached.

Torch-free: the weights come from the model's runtime as a float32 array, and everything here is
numpy and Pillow on the CPU pool. Answers are cached per (model, version, layer, options), so a
page looked at again costs nothing; a new model version is a new key.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from camserve.server import kernel_grid
from camserve.server.errors import InvalidRequest
from camserve.server.kernel_grid import GridLayout, GridPage
from camserve.server.records import ConvLayer, ModelMeta
from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb

DEFAULT_TILE_SIZE = 32
CACHE_BYTES = 128 << 20  # weights and PNGs kept, all models together
WEIGHT_BYTES = 4  # float32
LISTED_LAYERS = 12  # conv layers named in a refusal's message


class KernelRequestError(InvalidRequest):
    """A GetKernels request that cannot be answered as it is."""


@dataclass(frozen=True)
class KernelQuery:
    """A checked GetKernels request."""

    model: str
    version: str
    layer: ConvLayer
    colour: bool
    weights: bool
    grid: GridLayout | None
    page: int
    tile_size: int


@dataclass(frozen=True)
class KernelView:
    """What GetKernels answers: the weights and/or one page of their grid."""

    model: str
    version: str
    layer: str
    colour: bool
    weights: np.ndarray | None
    page: GridPage | None

    @property
    def nbytes(self) -> int:
        png = 0 if self.page is None else len(self.page.png)
        return png + (0 if self.weights is None else self.weights.nbytes)


def _conv_layer(meta: ModelMeta, name: str) -> ConvLayer:
    if not meta.conv_layers:
        raise KernelRequestError(f"model {meta.name!r} has no Conv2d layer, so no kernels to show")
    if not name:
        return meta.conv_layers[0]
    for layer in meta.conv_layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in meta.conv_layers]
    listed = ", ".join(names[:LISTED_LAYERS]) + (", ..." if len(names) > LISTED_LAYERS else "")
    raise KernelRequestError(
        f"layer {name!r} is not a Conv2d of model {meta.name!r}; kernels exist for its "
        f"{len(names)} conv layers: {listed} (all in ModelInfo.conv_layers)"
    )


def _grid(
    request: pb.GetKernelsRequest, layer: ConvLayer, colour: bool, limits: LimitsSettings
) -> GridLayout:
    per_page = request.tiles_per_page or limits.max_kernel_tiles
    if per_page > limits.max_kernel_tiles:
        raise KernelRequestError(
            f"tiles_per_page={per_page} is over the server's limit of {limits.max_kernel_tiles}; "
            "ask for fewer, or 0 for the limit"
        )
    if request.tile_size > limits.max_kernel_tile_size:
        raise KernelRequestError(
            f"tile_size={request.tile_size} is over the server's limit of "
            f"{limits.max_kernel_tile_size} pixels; ask for less, or 0 for {DEFAULT_TILE_SIZE}"
        )
    grid = kernel_grid.layout(layer.weight_shape, colour, per_page)
    if request.page >= grid.pages:
        raise KernelRequestError(
            f"page={request.page}: layer {layer.name!r} has {grid.pages} page(s) of at most "
            f"{grid.tiles_per_page} tiles ({grid.tiles} tiles); use 0..{grid.pages - 1}"
        )
    return grid


def kernel_query(
    request: pb.GetKernelsRequest, meta: ModelMeta, limits: LimitsSettings, max_bytes: int
) -> KernelQuery:
    """`request` checked against the model and the limits; KernelRequestError says the fix."""
    layer = _conv_layer(meta, request.layer)
    if request.skip_weights and request.skip_grid:
        raise KernelRequestError("skip_weights and skip_grid together leave nothing to return")
    first = meta.conv_layers[0]
    colour = layer == first and layer.groups == 1 and layer.weight_shape[1] == 3
    size = WEIGHT_BYTES * int(np.prod(layer.weight_shape))
    if not request.skip_weights and size > max_bytes:
        raise KernelRequestError(
            f"layer {layer.name!r}'s weights take {size} bytes, over the {max_bytes}-byte message "
            "limit; set skip_weights and page through the grid, or raise max_message_mb"
        )
    grid = None if request.skip_grid else _grid(request, layer, colour, limits)
    return KernelQuery(
        model=meta.name,
        version=meta.version,
        layer=layer,
        colour=colour,
        weights=not request.skip_weights,
        grid=grid,
        page=request.page,
        tile_size=request.tile_size or DEFAULT_TILE_SIZE,
    )


class KernelCatalogue:
    """Answers kernel queries, rendering on the CPU pool and keeping recent answers (LRU,
    bounded in bytes)."""

    def __init__(self, pool: Executor, max_bytes: int = CACHE_BYTES) -> None:
        self._pool = pool
        self._max_bytes = max_bytes
        self._cache: OrderedDict[tuple[object, ...], KernelView] = OrderedDict()
        self._bytes = 0

    async def view(
        self, query: KernelQuery, weights_of: Callable[[str], Awaitable[np.ndarray]]
    ) -> KernelView:
        """The answer to `query`; `weights_of(layer)` reads a layer's weights when not cached."""
        key: tuple[object, ...] = (query.model, query.version, query.layer.name)
        key += (query.weights, query.grid, query.page, query.tile_size)
        if (cached := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return cached
        weights = await weights_of(query.layer.name)
        loop = asyncio.get_running_loop()
        page = None
        if query.grid is not None:
            render = kernel_grid.render_page
            page = await loop.run_in_executor(
                self._pool, render, weights, query.grid, query.page, query.tile_size
            )
        view = KernelView(
            query.model,
            query.version,
            query.layer.name,
            query.colour,
            weights if query.weights else None,
            page,
        )
        self._remember(key, view)
        return view

    def _remember(self, key: tuple[object, ...], view: KernelView) -> None:
        if view.nbytes > self._max_bytes:
            return
        self._cache[key] = view
        self._bytes += view.nbytes
        while self._bytes > self._max_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.nbytes
