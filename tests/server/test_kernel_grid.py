"""Kernel grids (`camserve.server.kernel_grid`) and the GetKernels cache, without a server."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camserve.server import kernel_grid
from camserve.server.engine.kernels import conv_layers, conv_weights
from camserve.server.kernels import KernelCatalogue, KernelQuery
from camserve.server.records import ConvLayer


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_pages_hold_whole_filters_when_they_fit() -> None:
    grid = kernel_grid.layout((128, 64, 3, 3), colour=False, tiles_per_page=1000)
    assert (grid.tiles, grid.tiles_per_page, grid.pages) == (8192, 960, 9)  # 15 filters a page
    assert (grid.block, grid.columns) == (64, 64)
    colour = kernel_grid.layout((64, 3, 7, 7), colour=True, tiles_per_page=1024)
    assert (colour.tiles, colour.pages, colour.columns) == (64, 1, 8)
    wide = kernel_grid.layout((4, 2000, 1, 1), colour=False, tiles_per_page=1024)
    assert (wide.tiles_per_page, wide.pages, wide.columns) == (1024, 8, 64)


def test_grayscale_tiles_sit_filter_by_filter_each_filter_min_max_normalised() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((5, 70, 2, 3)).astype(np.float32)
    weights[3] *= 1000  # scale does not matter: each filter is normalised on its own
    grid = kernel_grid.layout(weights.shape, colour=False, tiles_per_page=150)  # 2 filters a page
    page = kernel_grid.render_page(weights, grid, page=1, tile_size=6)  # filters 2 and 3
    assert (page.page, page.pages, page.first_filter, page.end_filter) == (1, 3, 2, 4)
    assert (page.columns, page.rows, page.tiles) == (64, 4, 140)  # 70 channels wrap onto 2 rows
    image = decoded(page.png)
    scale, gap = 2, kernel_grid.GAP  # 6 px tiles for 3-wide kernels: 2 px per weight
    tile_h, tile_w = 2 * scale + gap, 3 * scale + gap
    assert image.shape == (gap + 4 * tile_h, gap + 64 * tile_w)
    for filter_index, channel in [(2, 0), (2, 65), (3, 7), (3, 69)]:
        local = filter_index - 2
        row = local * 2 + channel // 64
        col = channel % 64
        y, x = gap + row * tile_h, gap + col * tile_w
        drawn = image[y : y + 2 * scale : scale, x : x + 3 * scale : scale]
        values = weights[filter_index]
        expected = (values[channel] - values.min()) / (values.max() - values.min())
        np.testing.assert_array_equal(drawn, np.round(expected * 255).astype(np.uint8))


def test_colour_tiles_are_whole_rgb_filters() -> None:
    weights = np.random.default_rng(1).standard_normal((10, 3, 5, 5)).astype(np.float32)
    grid = kernel_grid.layout(weights.shape, colour=True, tiles_per_page=1024)
    page = kernel_grid.render_page(weights, grid, page=0, tile_size=5)
    image = decoded(page.png)
    assert (page.columns, page.rows, page.tiles) == (4, 3, 10)
    assert image.shape == (1 + 3 * 6, 1 + 4 * 6, 3)
    tile = image[1 + 6 : 1 + 6 + 5, 1 + 6 : 1 + 6 + 5]  # filter 5: row 1, column 1
    values = weights[5]
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_array_equal(tile, np.round(expected.transpose(1, 2, 0) * 255))


def test_conv_layers_and_weights_follow_the_state_dict_through_memory_format_and_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8, 2)
    )
    state = {k: v.clone() for k, v in model.state_dict().items() if "weight" in k}
    model = model.to(memory_format=torch.channels_last).to(torch.bfloat16)
    assert conv_layers(model) == (
        ConvLayer("0", (8, 3, 3, 3), 1),
        ConvLayer("2", (8, 2, 3, 3), 4),
    )
    weights = conv_weights(model, "2")
    assert weights.dtype == np.float32
    assert weights.flags.c_contiguous
    np.testing.assert_array_equal(weights, state["2.weight"].to(torch.bfloat16).float().numpy())
    with pytest.raises(TypeError, match="not a Conv2d"):
        conv_weights(model, "1")


async def test_answers_are_cached_per_model_version() -> None:
    weights = np.ones((4, 3, 3, 3), dtype=np.float32)
    reads: list[str] = []

    async def weights_of(layer: str) -> np.ndarray:
        reads.append(layer)
        return weights

    layer = ConvLayer("conv1", weights.shape, 1)
    grid = kernel_grid.layout(weights.shape, colour=True, tiles_per_page=16)

    def query(version: str) -> KernelQuery:
        return KernelQuery("m", version, layer, True, True, grid, 0, 32)

    with ThreadPoolExecutor(1) as pool:
        catalogue = KernelCatalogue(pool)
        first = await catalogue.view(query("1"), weights_of)
        again = await catalogue.view(query("1"), weights_of)
        other = await catalogue.view(query("2"), weights_of)
        await asyncio.sleep(0)
    assert again is first
    assert other is not first
    assert reads == ["conv1", "conv1"]
    assert first.page is not None
    assert decoded(first.page.png).shape[-1] == 3
