"""A timm vision transformer served end to end: seeded weights in a .safetensors file, the
`camserve` command line and the client against a real server."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from camserve.client import Client, InvalidArgument
from tests._support.servers import CAT_JPEG, ServerThread

COMMAND = [sys.executable, "-c", "from camserve.client.cli import main; raise SystemExit(main())"]
MODEL = "deit"
DEFAULT_LAYER = "blocks.11.norm1"


@pytest.fixture(scope="module")
def vit_server(deit_weights, test_settings):
    from camserve.server.settings import ModelSettings

    spec = ModelSettings(
        name=MODEL,
        source="timm:deit_tiny_distilled_patch16_224",
        weights=str(deit_weights),
        max_batch_size=4,
    )
    server = ServerThread(test_settings(models=(spec,), metrics_port=-1))
    yield server
    server.stop(grace=1.0)


def test_the_command_line_writes_a_non_empty_overlay(vit_server, tmp_path) -> None:
    done = subprocess.run(
        [
            *COMMAND,
            "explain",
            str(CAT_JPEG),
            "--server",
            vit_server.address,
            "--method",
            "gradcam",
            "--method",
            "layercam",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chelsea.jpg: ")
    written = sorted(tmp_path.iterdir())
    assert [p.name.rsplit("_", 1)[0] for p in written] == ["chelsea_gradcam", "chelsea_layercam"]
    photo = np.asarray(Image.open(CAT_JPEG).convert("RGB"), dtype=np.float32)
    for path in written:
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            overlay = np.asarray(picture.convert("RGB"), dtype=np.float32)
        assert overlay.shape == photo.shape
        # The heatmap is drawn over the photo: the overlay differs from it, unevenly.
        difference = np.abs(overlay - photo).mean(axis=2)
        assert difference.mean() > 5
        assert difference.std() > 1


def test_token_layers_are_listed_and_explained(vit_server) -> None:
    with Client(address=vit_server.address, timeout=120) as client:
        info = client.model(MODEL)
        assert info.default_layer == DEFAULT_LAYER
        layers = {layer.name: layer.output_shape for layer in info.layers}
        assert layers[DEFAULT_LAYER] == (192, 14, 14)
        assert layers["patch_embed.proj"] == (192, 14, 14)
        # timm's own preprocessing for DeiT: 248 then a 224 centre crop, ImageNet statistics.
        assert (info.input.resize, info.input.height, info.input.width) == (248, 224, 224)
        assert info.input.mean == pytest.approx((0.485, 0.456, 0.406))

        explanation = client.explain(
            CAT_JPEG, methods=["gradcam", "gradcampp"], resolution="feature", raw=True
        )
        assert explanation.layer == DEFAULT_LAYER
        for method in ("gradcam", "gradcampp"):
            heatmap = explanation.heatmap(method)
            assert heatmap.shape == (14, 14)
            assert float(heatmap.max()) > 0
            assert float(heatmap.std()) > 0

        with pytest.raises(InvalidArgument) as refused:
            client.explain(CAT_JPEG, layer="blocks.11")
        message = str(refused.value)
        assert "'blocks.11': its patch tokens receive no gradient from the logits" in message
        assert f"{DEFAULT_LAYER!r} (the default)" in message


def test_ablationcam_at_a_token_layer_is_refused_before_any_trace(vit_server, monkeypatch) -> None:
    from camserve.server.engine import tail

    traced: list[str] = []
    split_after = tail.split_after

    def recorded(model, layer):
        traced.append(layer)
        return split_after(model, layer)

    monkeypatch.setattr(tail, "split_after", recorded)
    with (
        Client(address=vit_server.address, timeout=120) as client,
        pytest.raises(InvalidArgument) as refused,
    ):
        client.explain(CAT_JPEG, methods=["gradcam", "ablationcam"])  # at the default layer
    message = str(refused.value)
    assert (
        f"methods: ablationcam cannot explain layer {DEFAULT_LAYER!r} of model 'deit', whose "
        "output is laid out tokens; it takes nchw layers"
    ) in message
    assert "a layer it works at: " in message
    assert "blocks.11.attn.k_norm (25 in all, listed by GetModel)" in message
    # Refused in validation: no admission (which would trace the model to price the rows after
    # the layer: the model did not at load, its default layer taking no such method), no fx
    # trace, no explain pass.
    assert traced == []


def test_a_token_layer_comes_back_as_channel_first_grids(vit_server, deit_weights) -> None:
    import timm
    import torch
    from safetensors.torch import load_file

    image = np.random.default_rng(5).standard_normal((3, 224, 224)).astype(np.float32)
    with Client(address=vit_server.address) as client:
        got = client.explain(
            image, model=MODEL, feature_layers=["blocks.5"], channels=[0, 7, 191], feature_raw=True
        )
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    model.load_state_dict(load_file(str(deit_weights)))  # as a user loads a fine-tune
    seen: list[torch.Tensor] = []
    handle = model.blocks[5].register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    with torch.no_grad():
        model(torch.from_numpy(image)[None])
    handle.remove()
    grid = seen[0][0, 2:].reshape(14, 14, 192).permute(2, 0, 1)  # class and distillation tokens
    found = got.feature_maps["blocks.5"]
    assert found.array.shape == (3, 14, 14)
    assert found.channels == (0, 7, 191)
    np.testing.assert_allclose(found.array, grid[[0, 7, 191]].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found.means, grid.mean((1, 2)).numpy(), rtol=1e-5, atol=1e-5)
