"""The blocking client against a real camserve server (the shared `camserve_server` fixture)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from camserve.client import (
    Client,
    DeadlineExceeded,
    Explanation,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
)
from tests._support.client_fakes import CAT, CAT_CLASSES, CAT_SIZE, ESPRESSO, normalised
from tests._support.servers import CAT_BYTES, CAT_JPEG, COFFEE_JPEG


@pytest.fixture(scope="module")
def client(camserve_server):
    with Client(address=camserve_server.address, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    "form", ["path", "str", "bytes", "pil", "uint8"], ids=lambda form: f"image-as-{form}"
)
def test_every_image_form_explains_the_cat(client, form) -> None:
    picture = Image.open(CAT_JPEG).convert("RGB")
    image = {
        "path": CAT_JPEG,
        "str": str(CAT_JPEG),
        "bytes": CAT_BYTES,
        "pil": picture,
        "uint8": np.asarray(picture),
    }[form]
    explanation = client.explain(image)
    assert explanation.top.index == CAT
    assert explanation.top.label == "Egyptian cat"
    assert len(explanation.predictions) == 5
    assert explanation.model == "efficientnet-lite0"
    assert explanation.model_version
    assert explanation.request_id
    assert explanation.layer
    heatmap = explanation.heatmap()
    assert heatmap.shape == CAT_SIZE
    assert heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0
    # Normalised over the model input, then resampled onto the original: the peak may fall
    # between output pixels, so it is close to 1, not always exactly 1.
    assert 0.9 < heatmap.max() <= 1.0
    assert explanation.timing.total_ms > 0
    assert explanation.batch_size >= 1


def test_a_normalised_float_tensor_is_used_as_is(client) -> None:
    tensor = normalised(Image.open(CAT_JPEG).convert("RGB"), client.model("efficientnet-lite0"))
    explanation = client.explain(tensor.astype(np.float32))
    assert explanation.top.index in CAT_CLASSES
    assert explanation.heatmap().shape == (224, 224)  # the tensor's own size is the original


def test_output_options(client) -> None:
    assert client.explain(CAT_JPEG, resolution="input").heatmap().shape == (224, 224)
    assert client.explain(CAT_JPEG, resolution=(50, 60)).heatmap().shape == (50, 60)
    feature = client.explain(CAT_JPEG, resolution="feature", dtype="uint8").heatmap()
    assert feature.dtype == np.uint8
    assert feature.shape[0] < 20
    assert client.explain(CAT_JPEG, dtype="float16").heatmap().dtype == np.float16
    raw = client.explain(CAT_JPEG, raw=True, resolution="feature").heatmap()
    assert raw.min() >= 0
    with_overlay = client.explain(CAT_JPEG, overlay=True, top_predictions=2)
    assert with_overlay.overlay is not None
    assert with_overlay.overlay.size == (CAT_SIZE[1], CAT_SIZE[0])
    assert len(with_overlay.predictions) == 2


def test_targets_methods_and_layers(client) -> None:
    several = client.explain(CAT_JPEG, target=[CAT, "tabby"], methods=["gradcam", "layercam"])
    assert set(several.heatmaps) == {
        ("gradcam", 285),
        ("gradcam", 281),
        ("layercam", 285),
        ("layercam", 281),
    }
    assert several.class_labels == {285: "Egyptian cat", 281: "tabby"}
    top2 = client.explain(CAT_JPEG, top_k=2, methods="hirescam")
    assert [key[1] for key in top2.heatmaps] == [p.index for p in top2.predictions[:2]]
    info = client.model("efficientnet-lite0")
    other_layer = next(layer.name for layer in info.layers if layer.name != info.default_layer)
    assert client.explain(CAT_JPEG, layer=other_layer).layer == other_layer


def test_explain_batch_sends_images_together(client) -> None:
    cat, coffee = client.explain_batch([CAT_JPEG, COFFEE_JPEG], methods=["gradcam"])
    assert (cat.top.index, coffee.top.index) == (CAT, ESPRESSO)
    assert cat.request_id == coffee.request_id
    assert cat.batch_size == coffee.batch_size >= 2


def test_explain_many_keeps_input_order(client) -> None:
    images = [CAT_JPEG, COFFEE_JPEG] * 4
    results = list(client.explain_many(images, max_in_flight=3, model="efficientnet-lite0"))
    assert all(isinstance(r, Explanation) for r in results)
    assert [r.top.index for r in results] == [CAT, ESPRESSO] * 4
    assert len({r.request_id for r in results}) == len(images)


def test_explain_many_raises_a_bad_image_in_its_place(client) -> None:
    stream = client.explain_many([CAT_JPEG, b"not an image", COFFEE_JPEG])
    assert next(stream).top.index == CAT
    with pytest.raises(InvalidArgument, match="decodable"):
        next(stream)
    outcomes = list(
        client.explain_many([CAT_JPEG, b"not an image", COFFEE_JPEG], return_exceptions=True)
    )
    assert isinstance(outcomes[1], InvalidArgument)
    assert [o.top.index for o in (outcomes[0], outcomes[2])] == [CAT, ESPRESSO]


def test_models_describe_both_models(client) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {"efficientnet-lite0", "resnet18"}
    resnet = models["resnet18"]
    assert resnet == client.model("resnet18")
    assert resnet.ready
    assert resnet.num_classes == 1000
    assert resnet.labels[:2] == ("class_0", "class_1")
    assert resnet.input.height == resnet.input.width == 224
    assert resnet.default_layer in {layer.name for layer in resnet.layers}
    layer4 = next(layer for layer in resnet.layers if layer.name == "layer4")
    assert layer4.output_shape == (512, 7, 7)
    assert "gradcam" in resnet.methods
    assert resnet.max_batch_size == 8
    assert models["efficientnet-lite0"].labels[CAT] == "Egyptian cat"


def test_health(client) -> None:
    assert client.health()
    assert client.health_status() == "SERVING"


def test_unknown_model_is_not_found_with_the_server_message(client) -> None:
    with pytest.raises(NotFound, match="no-such-model") as missing:
        client.explain(CAT_JPEG, model="no-such-model")
    assert "efficientnet-lite0" in missing.value.message  # the server lists what it has
    with pytest.raises(NotFound, match="no-such-model"):
        client.model("no-such-model")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"layer": "no.such.layer"}, "no.such.layer"),
        ({"target": "no such label"}, "no such label"),
        ({"target": 5000}, "out of range"),
        ({"top_k": 50}, "top_k"),
    ],
)
def test_bad_requests_are_invalid_argument_with_the_server_message(client, options, words) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.explain(CAT_JPEG, **options)
    assert words in refused.value.message
    assert refused.value.code.name == "INVALID_ARGUMENT"


def test_a_tiny_timeout_is_deadline_exceeded(client) -> None:
    with pytest.raises(DeadlineExceeded) as late:
        client.explain(CAT_JPEG, timeout=0.001)
    assert late.value.message


def test_nothing_listening_is_unavailable_after_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    with Client(address=f"127.0.0.1:{port}", retry=policy, timeout=5) as client:
        with pytest.raises(Unavailable) as down:
            client.explain(CAT_BYTES)
        assert down.value.message
        with pytest.raises(Unavailable):
            client.health()


def test_scorecam_on_the_builtin_model_with_default_settings_is_served_when_idle(client) -> None:
    info = client.model("efficientnet-lite0")
    cost = info.cost("scorecam")
    assert cost.forward_passes > 256  # more than the model's whole default queue
    explanation = client.explain(
        CAT_JPEG,
        model="efficientnet-lite0",
        methods="scorecam",
        resolution="feature",
        raw=True,
        timeout=300,  # 1,321 forward passes on the CPU
    )
    heatmap = explanation.heatmap("scorecam")
    assert heatmap.shape == (7, 7)
    assert float(heatmap.max()) > 0
    assert explanation.top.index in CAT_CLASSES
