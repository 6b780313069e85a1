"""Pixel attributions through a real server and both SDK clients, and the CLI (the ten-class
tiny network of tests._support.traffic at 32x32, so every method runs in milliseconds)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.client import AsyncClient, Client, InvalidArgument, cli
from tests._support.servers import CAT_JPEG, COFFEE_JPEG, ServerThread
from tests._support.traffic import SMOOTH_SOURCE, tiny_model

PIXEL = (
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "guided_gradcam",
)
SIZE = 32  # the tiny model's input


@pytest.fixture(scope="module")
def server(test_settings) -> Iterator[ServerThread]:
    models = (
        tiny_model(max_delay_ms=200, max_gradient_rows=3),
        tiny_model("smooth", source=SMOOTH_SOURCE),
    )
    server = ServerThread(test_settings(models=models, metrics_port=-1))
    yield server
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server) -> Iterator[Client]:
    with Client(address=server.address, timeout=60) as client:
        yield client


def test_every_pixel_method_gives_a_map_at_every_resolution_with_scores(client) -> None:
    for resolution in ("input", "feature", "original"):
        explanation = client.explain(
            CAT_JPEG,
            model="tiny",
            methods=list(PIXEL),
            resolution=resolution,
            samples=4,
            steps=6,
            seed=1,
            scores=["deletion", "insertion"],
            score_steps=4,
            overlay=True,
        )
        assert [method for method, _ in explanation.heatmaps] == list(PIXEL)
        expected = (300, 451) if resolution == "original" else (SIZE, SIZE)
        for key, heatmap in explanation.heatmaps.items():
            assert heatmap.shape == expected, key
            assert heatmap.min() >= 0.0
            assert heatmap.max() <= 1.0
            assert set(explanation.scores[key]) == {"deletion_auc", "insertion_auc"}
        assert explanation.overlay is not None
        assert set(explanation.convergence_delta) == {
            ("integrated_gradients", explanation.top.index)
        }


def test_raw_gives_the_unreduced_attribution_and_reductions_are_named(client) -> None:
    common = {"model": "tiny", "methods": ["saliency", "input_x_gradient"], "target": 3}
    raw = client.explain(CAT_JPEG, raw=True, resolution="original", **common)
    gradient = raw.heatmap("saliency")
    times_input = raw.heatmap("input_x_gradient")
    assert gradient.shape == times_input.shape == (3, SIZE, SIZE)  # input resolution, always
    reduced = client.explain(CAT_JPEG, resolution="input", **common)
    np.testing.assert_allclose(
        reduced.heatmap("saliency"), _min_max(np.abs(gradient).max(axis=0)), atol=1e-6
    )
    np.testing.assert_allclose(  # input x gradient: the signed sum by default
        reduced.heatmap("input_x_gradient"), _min_max(times_input.sum(axis=0)), atol=1e-6
    )
    summed = client.explain(CAT_JPEG, resolution="input", reduction="sum_abs", **common)
    np.testing.assert_allclose(
        summed.heatmap("saliency"), _min_max(np.abs(gradient).sum(axis=0)), atol=1e-6
    )
    clipped = client.explain(CAT_JPEG, resolution="input", normalisation="percentile_99", **common)
    flat = np.abs(gradient).max(axis=0)
    ceiling = np.quantile(flat, 0.99)
    expected = _min_max(np.minimum(flat, ceiling))
    np.testing.assert_allclose(clipped.heatmap("saliency"), expected, atol=1e-5)
    assert (clipped.heatmap("saliency") == 1.0).sum() >= 10  # the top 1% saturate


def test_pixel_maps_come_in_every_dtype(client) -> None:
    common = {"model": "tiny", "methods": "guided_backprop", "target": 1, "resolution": "input"}
    full = client.explain(CAT_JPEG, **common).heatmap()
    half = client.explain(CAT_JPEG, dtype="float16", **common).heatmap()
    byte = client.explain(CAT_JPEG, dtype="uint8", **common).heatmap()
    assert (half.dtype, byte.dtype) == (np.float16, np.uint8)
    np.testing.assert_allclose(half, full, atol=1e-3)
    np.testing.assert_array_equal(byte, np.round(full * 255).astype(np.uint8))
    raw_half = client.explain(CAT_JPEG, dtype="float16", raw=True, **common).heatmap()
    assert (raw_half.dtype, raw_half.shape) == (np.float16, (3, SIZE, SIZE))


def _min_max(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_smoothgrad_is_reproducible_with_a_seed_and_the_sync_and_async_clients_agree(
    client, server
) -> None:
    options = {"model": "tiny", "methods": "smoothgrad", "samples": 5, "seed": 7, "raw": True}
    first = client.explain(CAT_JPEG, **options).heatmap()
    again = client.explain(CAT_JPEG, **options).heatmap()
    other = client.explain(CAT_JPEG, **{**options, "seed": 8}).heatmap()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)

    async def from_async() -> np.ndarray:
        async with AsyncClient(address=server.address, timeout=60) as aio:
            return (await aio.explain(CAT_JPEG, **options)).heatmap()

    np.testing.assert_array_equal(asyncio.run(from_async()), first)


def test_mixed_concurrent_requests_share_a_batch_and_each_equals_its_answer_alone(
    client, server
) -> None:
    """Saliency, Grad-CAM, Guided Grad-CAM with Grad-CAM, and IG requests arrive together (the
    model waits 200 ms to fill a batch); each answer equals the one it gets alone."""
    requests = [
        {"methods": "saliency", "top_k": 2},
        {"methods": "gradcam"},
        {"methods": ["guided_gradcam", "gradcam"], "target": 4},
        {"methods": ["integrated_gradients", "input_x_gradient"], "steps": 4},
    ]
    images = [CAT_JPEG, COFFEE_JPEG, CAT_JPEG, COFFEE_JPEG]

    async def together() -> list:
        async with AsyncClient(address=server.address, timeout=60) as aio:
            calls = [
                aio.explain(image, model="tiny", raw=True, **options)
                for image, options in zip(images, requests, strict=True)
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(together())
    assert max(answer.batch_size for answer in answers) >= 2
    for image, options, answer in zip(images, requests, answers, strict=True):
        alone = client.explain(image, model="tiny", raw=True, **options)
        assert list(answer.heatmaps) == list(alone.heatmaps)
        for key, heatmap in alone.heatmaps.items():
            np.testing.assert_allclose(answer.heatmaps[key], heatmap, rtol=1e-4, atol=1e-6)


def test_guided_methods_are_refused_on_a_smooth_model_naming_the_activation(client) -> None:
    info = client.model("smooth")
    assert "saliency" in info.methods
    assert "guided_backprop" not in info.methods
    assert "guided_gradcam" not in info.methods
    assert "guided_backprop" in client.model("tiny").methods  # a ReLU network
    with pytest.raises(InvalidArgument) as refused:
        client.explain(CAT_JPEG, model="smooth", methods=["saliency", "guided_backprop"])
    assert refused.value.message.startswith(
        "methods: guided_backprop needs ReLU or ReLU6 nonlinearities; this model uses SiLU "
        "(at features.3, 1 call)"
    )


@pytest.mark.parametrize(
    ("options", "start"),
    [
        ({"samples": 201}, "pixel_attribution.samples: 201 is outside 1..200"),
        ({"steps": 1, "quadrature": "riemann_left"}, "pixel_attribution.steps: 1 is outside 2.."),
        ({"aug_smooth": True}, "aug_smooth: averages layer maps over augmented copies"),
    ],
)
def test_bad_pixel_options_are_invalid_argument_naming_the_field(client, options, start) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.explain(CAT_JPEG, model="tiny", methods="smoothgrad", **options)
    assert refused.value.message.startswith(start)


def test_cli_writes_a_grayscale_overlay_per_pixel_method(server, tmp_path: Path, capsys) -> None:
    code = cli.main(
        [
            "explain",
            str(CAT_JPEG),
            "--server",
            server.address,
            "--model",
            "tiny",
            "--method",
            "saliency",
            "--method",
            "guided_gradcam",
            "--colormap",
            "gray",
            "--target",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["chelsea_guided_gradcam_2.png", "chelsea_saliency_2.png"]
    with Image.open(tmp_path / "chelsea_saliency_2.png") as picture:
        assert picture.size == (451, 300)


def test_cli_compare_scores_the_pixel_methods(server, tmp_path: Path, capsys) -> None:
    code = cli.main(
        [
            "compare",
            str(CAT_JPEG),
            "--server",
            server.address,
            "--model",
            "tiny",
            "--methods",
            "gradcam,saliency,smoothgrad,guided_backprop",
            "--samples",
            "3",
            "--score-steps",
            "4",
            "--out",
            str(tmp_path / "panel.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for method in ("saliency", "smoothgrad", "guided_backprop"):
        assert any(line.startswith(method) for line in out.splitlines()), out
    assert (tmp_path / "panel.png").is_file()
