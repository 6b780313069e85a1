"""GetKernels through a real server: the SDK (sync and asyncio) and `camserve kernels`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.client import AsyncClient, Client, InvalidArgument, NotFound, cli


@pytest.fixture(scope="module")
def resnet_state(resnet18_weights: Path) -> dict[str, torch.Tensor]:
    return torch.load(resnet18_weights, weights_only=True)


@pytest.fixture(params=["one-process", "frontends-2"])
def layout(request: pytest.FixtureRequest) -> Any:
    """The shared server in one process, and with the weights in an engine process (they reach
    a frontend through the shared-memory ring)."""
    name = "camserve_server" if request.param == "one-process" else "camserve_processes"
    return request.getfixturevalue(name)


def test_the_first_rgb_conv_comes_in_colour_with_its_exact_weights(
    layout: Any, resnet_state: dict[str, torch.Tensor]
) -> None:
    with Client(address=layout.address) as client:
        info = client.model("resnet18")
        kernels = client.kernels(model="resnet18")  # no layer: the first conv
    assert [conv.name for conv in info.conv_layers][:3] == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
    ]
    assert len(info.conv_layers) == 20  # downsample convolutions included
    assert info.conv_layers[0].weight_shape == (64, 3, 7, 7)
    assert kernels.layer == "conv1"
    assert kernels.colour
    assert kernels.weights is not None
    np.testing.assert_array_equal(kernels.weights, resnet_state["conv1.weight"].numpy())
    assert (kernels.pages, kernels.tiles, kernels.rows, kernels.columns) == (1, 64, 8, 8)
    picture = kernels.image()
    assert picture.mode == "RGB"
    assert picture.size == (1 + 8 * (28 + 1), 1 + 8 * (28 + 1))  # 7x7 kernels at 4 px a weight


async def test_deeper_convs_page_through_grayscale_tiles(
    camserve_server: Any, resnet_state: dict[str, torch.Tensor]
) -> None:
    async with AsyncClient(address=camserve_server.address) as client:
        first = await client.kernels("layer2.0.conv1", model="resnet18", tiles_per_page=512)
        last = await client.kernels(
            "layer2.0.conv1", model="resnet18", tiles_per_page=512, page=15, weights=False
        )
    np.testing.assert_array_equal(first.weights, resnet_state["layer2.0.conv1.weight"].numpy())
    assert not first.colour
    assert (first.pages, first.first_filter, first.end_filter, first.tiles) == (16, 0, 8, 512)
    assert (last.page, last.first_filter, last.end_filter) == (15, 120, 128)
    assert last.weights is None
    grid = np.asarray(Image.open(io.BytesIO(last.grid_png)))
    assert grid.ndim == 2  # grayscale
    assert grid.shape == (1 + last.rows * (30 + 1), 1 + 64 * (30 + 1))  # 3x3 at 10 px a weight


def test_depthwise_convs_of_the_builtin_model_have_a_tile_per_filter(camserve_server: Any) -> None:
    with Client(address=camserve_server.address) as client:
        info = client.model("efficientnet-lite0")
        depthwise = next(conv for conv in info.conv_layers if conv.groups > 1)
        kernels = client.kernels(depthwise.name)
    assert kernels.weights is not None
    assert kernels.weights.shape == depthwise.weight_shape
    assert kernels.weights.shape[1] == 1
    assert kernels.tiles == depthwise.weight_shape[0]


def test_bad_kernel_requests_are_refused_with_the_fix(camserve_server: Any) -> None:
    with Client(address=camserve_server.address) as client:
        with pytest.raises(InvalidArgument, match=r"'fc' is not a Conv2d.*20 conv layers: conv1, "):
            client.kernels("fc", model="resnet18")
        with pytest.raises(InvalidArgument, match=r"page=99: .* use 0\.\.15"):
            client.kernels("layer2.0.conv1", model="resnet18", tiles_per_page=512, page=99)
        with pytest.raises(InvalidArgument, match="over the server's limit of 1024"):
            client.kernels("conv1", model="resnet18", tiles_per_page=5000)
        with pytest.raises(InvalidArgument, match="tile_size=4096"):
            client.kernels("conv1", model="resnet18", tile_size=4096)
        with pytest.raises(NotFound):
            client.kernels(model="alexnet")
        with pytest.raises(ValueError, match="nothing to ask for"):
            client.kernels(weights=False, grid=False)


def test_the_kernels_command_writes_the_grid(
    camserve_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--server", camserve_server.address, "--model", "resnet18"]
    code = cli.main(["kernels", *server, "--layer", "layer1.0.conv1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    written = tmp_path / "kernels_resnet18_layer1.0.conv1_p0.png"
    assert code == 0, out
    assert "page 1 of 4, filters 0..15, 1024 grayscale" in out
    with Image.open(written) as picture:
        assert picture.mode == "L"
    npy = tmp_path / "conv1.npy"
    assert cli.main(["kernels", *server, "--out", str(tmp_path / "c.png"), "--npy", str(npy)]) == 0
    assert np.load(npy).shape == (64, 3, 7, 7)
    assert cli.main(["kernels", *server, "--out", str(tmp_path / "c.txt")]) == 2
    assert cli.main(["kernels", *server, "--layer", "fc", "--out", str(tmp_path)]) == 1
    assert "not a Conv2d" in capsys.readouterr().err
