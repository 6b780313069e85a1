"""Feature maps and gate values through a real server: both clients, mixed batches, refusals,
the `features` and `attention` commands and the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from camserve.client import AsyncClient, Client, InvalidArgument, cli
from tests._support import attention_models
from tests._support.servers import CAT_JPEG, ServerThread, http_url, seeded_model

CROP = 224
RNG = np.random.default_rng(11)
INPUTS = [RNG.standard_normal((3, CROP, CROP)).astype(np.float32) for _ in range(4)]
CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # the server may run channels-last; batches may differ


@pytest.fixture(scope="module")
def effnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b0.pth"
    torch.save(seeded_model("efficientnet_b0").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def server(
    test_settings: Any, resnet18_weights: Path, effnet_weights: Path
) -> Iterator[ServerThread]:
    from camserve.server.settings import LimitsSettings, ModelSettings

    models = (
        ModelSettings(
            name="resnet18",
            source="torchvision:resnet18",
            weights=str(resnet18_weights),
            labels="",
            max_batch_size=8,
            max_delay_ms=400,  # concurrent requests of a test share one batch
        ),
        ModelSettings(
            name="effnet", source="torchvision:efficientnet_b0", weights=str(effnet_weights)
        ),
        ModelSettings(
            name="cbam", source=attention_models.CBAM_SOURCE, labels="", resize=0, crop=64
        ),
    )
    limits = LimitsSettings(max_feature_layers=3, max_feature_channels=32)
    started = ServerThread(test_settings(models=models, limits=limits, metrics_port=-1))
    yield started
    started.stop(grace=1.0)


def hooked(model: torch.nn.Module, names: Sequence[str], image: np.ndarray) -> dict:
    """Each named module's output for one image, from plain forward hooks."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: seen.__setitem__(name, out[0].detach().numpy().copy())
        )
        for name in names
    ]
    with torch.no_grad():  # channels-last, as the server runs CNNs on the CPU
        model.to(memory_format=torch.channels_last)
        model(torch.from_numpy(image)[None].to(memory_format=torch.channels_last))
    for handle in handles:
        handle.remove()
    return seen


async def together_and_alone(
    server: ServerThread, asks: Sequence[dict[str, Any]]
) -> tuple[list[Any], list[Any]]:
    """Each ask with its image of INPUTS, sent at once (one batch), then one after another."""
    async with AsyncClient(address=server.address) as client:
        pairs = list(zip(INPUTS, asks, strict=True))
        together = await asyncio.gather(
            *(client.explain(image, model="resnet18", **ask) for image, ask in pairs)
        )
        alone = [await client.explain(image, model="resnet18", **ask) for image, ask in pairs]
    return list(together), alone


def test_feature_maps_equal_hooks_and_come_back_as_asked(server: ServerThread) -> None:
    layers = ["conv1", "bn1", "layer4"]  # bn1 is ReLU'd in place after it
    with Client(address=server.address) as client:
        got = client.explain(
            INPUTS[0], model="resnet18", feature_layers=layers, channels=9, feature_raw=True
        )
        shaped = client.explain(
            INPUTS[0],
            model="resnet18",
            feature_layers=["layer1"],
            channels=4,
            feature_resolution="input",
            feature_dtype="uint8",
        )
    seen = hooked(seeded_model("resnet18"), layers, INPUTS[0])
    assert list(got.feature_maps) == layers
    assert got.heatmaps  # an explain request that also inspects
    assert got.predictions
    for layer in layers:
        found = got.feature_maps[layer]
        assert found.channels == tuple(range(9))
        np.testing.assert_allclose(found.array, seen[layer][:9], **CLOSE)
        np.testing.assert_allclose(found.means, seen[layer].mean((1, 2)), **CLOSE)
        np.testing.assert_allclose(found.maxes, seen[layer].max((1, 2)), **CLOSE)
    planes = shaped.feature_maps["layer1"].array
    assert planes.dtype == np.uint8
    assert planes.shape == (4, CROP, CROP)
    assert (planes.reshape(4, -1).max(1) == 255).all()  # each channel min-max normalised
    assert (planes.reshape(4, -1).min(1) == 0).all()


async def test_a_batch_mixing_feature_maps_and_plain_explains_answers_each_as_alone(
    server: ServerThread,
) -> None:
    asks: list[dict[str, Any]] = [
        {"methods": ["gradcam", "layercam"]},
        {"feature_layers": ["layer2", "layer3"], "channel_selection": "top_gradcam", "channels": 5},
        {"heatmaps": False, "feature_layers": ["conv1"], "channel_selection": "top_mean"},
        {"heatmaps": False, "feature_layers": ["layer1"], "channels": [3, 60, 1]},
    ]
    together, alone = await together_and_alone(server, asks)
    assert [answer.batch_size for answer in together] == [4] * 4
    assert [answer.batch_size for answer in alone] == [1] * 4
    for mixed, single in zip(together, alone, strict=True):
        assert mixed.heatmaps.keys() == single.heatmaps.keys()
        for key, heatmap in mixed.heatmaps.items():
            np.testing.assert_allclose(heatmap, single.heatmaps[key], **CLOSE)
        assert [p.index for p in mixed.predictions] == [p.index for p in single.predictions]
        assert mixed.feature_maps.keys() == single.feature_maps.keys()
        for layer, found in mixed.feature_maps.items():
            assert found.channels == single.feature_maps[layer].channels
            np.testing.assert_allclose(found.array, single.feature_maps[layer].array, **CLOSE)
    assert not together[2].predictions  # forward only: no logits
    assert not together[2].heatmaps
    assert together[3].feature_maps["layer1"].channels == (3, 60, 1)
    seen = hooked(seeded_model("resnet18"), ["conv1"], INPUTS[2])["conv1"]
    ranked = np.argsort(-seen.mean((1, 2)), kind="stable")[:16]
    assert together[2].feature_maps["conv1"].channels == tuple(ranked.tolist())


def test_efficientnet_b0_gate_values_equal_hooks(server: ServerThread) -> None:
    with Client(address=server.address) as client:
        info = client.model("effnet")
        got = client.explain(INPUTS[1], model="effnet", gates=True, heatmaps=False)
    names = [gate.name for gate in info.gates]
    assert len(names) == 16
    assert list(got.gates) == names
    seen = hooked(seeded_model("efficientnet_b0"), names, INPUTS[1])
    for name in names:
        assert got.gates[name].kind == "channel"
        np.testing.assert_allclose(got.gates[name].values, seen[name].reshape(-1), **CLOSE)


async def test_spatial_gates_lie_over_the_photo_like_heatmaps(server: ServerThread) -> None:
    async with AsyncClient(address=server.address) as client:
        info = await client.model("cbam")
        spatial = [gate.name for gate in info.gates if gate.kind == "spatial"]
        got = await client.explain(
            CAT_JPEG, model="cbam", gates=spatial[:2], gate_resolution="original"
        )
    width, height = Image.open(CAT_JPEG).size
    assert list(got.gates) == spatial[:2]
    for gate in got.gates.values():
        assert gate.kind == "spatial"
        assert gate.values.shape == (height, width)
        assert gate.values.min() >= 0.0
        assert gate.values.max() <= 1.0
    assert got.heatmaps  # gates beside the heatmaps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "resnet18", "feature_layers": ["layer9"]}, "feature_maps.layers[0]: 'layer9'"),
        (
            {"model": "resnet18", "feature_layers": ["conv1", "layer1", "layer2", "layer3"]},
            "4 layers is over the limit of 3",
        ),
        ({"model": "resnet18", "feature_layers": ["conv1"], "channels": 33}, "limit of 32"),
        (
            {"model": "resnet18", "feature_layers": ["conv1"], "channels": [2, 64]},
            "64 is out of range",
        ),
        ({"model": "resnet18", "gates": True}, "has no attention gates"),
        ({"model": "cbam", "gates": ["fc"]}, "gates.names[0]: 'fc' is not a gate"),
    ],
)
def test_bad_feature_and_gate_options_are_refused_with_the_fix(
    server: ServerThread, options: dict[str, Any], message: str
) -> None:
    with Client(address=server.address) as client, pytest.raises(InvalidArgument) as caught:
        client.explain(INPUTS[0], **options)
    assert message in str(caught.value)


def test_feature_maps_over_the_message_limit_are_refused(server_factory: Any) -> None:
    small = server_factory(max_message_mb=4, metrics_port=-1)
    with Client(address=small.address) as client, pytest.raises(InvalidArgument) as caught:
        client.explain(
            CAT_JPEG,
            model="resnet18",
            heatmaps=False,
            feature_layers=["layer1", "layer2"],
            channels=32,
            feature_resolution="original",
        )
    assert "over the server's message limit" in str(caught.value)
    assert "fewer feature-map layers or channels" in str(caught.value)


def test_the_commands_write_feature_grids_and_attention_figures(
    server: ServerThread, tmp_path: Path
) -> None:
    common = ["--server", server.address]
    status = cli.main(
        [
            "features",
            str(CAT_JPEG),
            *common,
            "--model",
            "resnet18",
            "--layer",
            "conv1",
            "--layer",
            "layer1",
            "--channels",
            "9",
            "--out",
            str(tmp_path / "f"),
        ]
    )
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "chelsea_conv1.png",
        "chelsea_layer1.png",
    ]
    status = cli.main(
        ["attention", str(CAT_JPEG), *common, "--model", "cbam", "--out", str(tmp_path / "a")]
    )
    assert status == 0
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert written[0] == "chelsea_channel_gates.png"
    assert len(written) == 1 + 8  # the stacked bar charts and the 8 spatial gates
    overlaid = Image.open(tmp_path / "a" / written[1])
    assert overlaid.size == Image.open(CAT_JPEG).size
    assert (
        cli.main(
            [
                "attention",
                str(CAT_JPEG),
                *common,
                "--model",
                "resnet18",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 1
    )


async def test_the_http_api_takes_the_same_options(server: ServerThread) -> None:
    body = {
        "images": [{"encoded": base64.b64encode(CAT_JPEG.read_bytes()).decode()}],
        "feature_maps": {"layers": ["layer1"], "channels": 4},
        "no_heatmaps": True,
    }
    url = http_url(server, "/v1/models/resnet18:explain")
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.post(url, data=json.dumps(body), headers=headers) as reply,
    ):
        assert reply.status == 200, await reply.text()
        answer = await reply.json()
    found = answer["results"][0]["feature_maps"][0]
    assert found["layer"] == "layer1"
    assert found["data"]["shape"] == ["4", "56", "56"]
    assert found["channels"] == [0, 1, 2, 3]
    assert len(found["channel_means"]) == 64
    assert "predictions" not in answer["results"][0]


async def test_feature_maps_and_pixel_attributions_share_a_batch_and_answer_as_alone(
    server: ServerThread,
) -> None:
    asks: list[dict[str, Any]] = [
        {"methods": ["saliency", "gradcam"], "feature_layers": ["layer1"], "channels": 3},
        {"heatmaps": False, "feature_layers": ["layer2"], "channels": 4, "feature_raw": True},
        {"methods": ["integrated_gradients"], "steps": 4, "feature_layers": ["layer3"]},
        {"methods": ["guided_gradcam"], "feature_layers": ["layer4"], "channels": 2},
    ]
    together, alone = await together_and_alone(server, asks)
    assert [answer.batch_size for answer in together] == [4] * 4
    for mixed, single, ask in zip(together, alone, asks, strict=True):
        assert mixed.heatmaps.keys() == single.heatmaps.keys()
        assert len(mixed.heatmaps) == len(ask.get("methods", []))
        for key, heatmap in mixed.heatmaps.items():
            assert np.isfinite(heatmap).all()
            np.testing.assert_allclose(heatmap, single.heatmaps[key], rtol=1e-4, atol=1e-4)
        assert list(mixed.feature_maps) == ask["feature_layers"]
        for layer, found in mixed.feature_maps.items():
            assert found.channels == single.feature_maps[layer].channels
            np.testing.assert_allclose(found.array, single.feature_maps[layer].array, **CLOSE)
    assert len(together[2].convergence_delta) == 1
    seen = hooked(seeded_model("resnet18"), ["layer2"], INPUTS[1])["layer2"]
    np.testing.assert_allclose(together[1].feature_maps["layer2"].array, seen[:4], **CLOSE)
