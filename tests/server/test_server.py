"""The server through real gRPC channels: round trips, batching, validation, model sources."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve.client.render import overlay
from camserve.server.engine import CamEngine, RowRequest
from camserve.server.engine.shaping import shape_heatmaps
from camserve.server.preprocess import prepare
from camserve.server.records import InputRecipe
from camserve.server.settings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LimitsSettings,
    ModelSettings,
    Settings,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import from_proto, to_proto
from tests._support import gated_model
from tests._support.servers import (
    CAT_BYTES,
    ServerThread,
    onto_original_float64,
    png_bytes,
    seeded_images,
    seeded_model,
)

pytestmark = pytest.mark.timeout(240)


async def test_round_trip_gives_the_requested_shape_dtype_and_top_class(
    camserve_server: Any,
) -> None:
    async with grpc.aio.insecure_channel(camserve_server.address) as channel:
        reply = await pb_grpc.ExplainServiceStub(channel).Explain(
            pb.ExplainRequest(
                images=[pb.Image(encoded=CAT_BYTES)],
                methods=[pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM],
                output=pb.OutputOptions(resolution=pb.RESOLUTION_INPUT, dtype=pb.DTYPE_FLOAT16),
                request_id="cat-1",
            )
        )
    assert reply.request_id == "cat-1"
    assert reply.model == "efficientnet-lite0"
    (result,) = reply.results
    assert 281 <= result.predictions[0].index <= 285
    assert len(result.predictions) == 5
    assert [h.method for h in result.heatmaps] == [pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM]
    for heatmap in result.heatmaps:
        array = from_proto(heatmap.data)
        assert array.shape == (224, 224)
        assert array.dtype == np.float16
        assert heatmap.class_index == result.predictions[0].index
        assert heatmap.layer == "head"
        assert float(array.min()) == 0.0
        assert float(array.max()) == pytest.approx(1.0, abs=1e-3)
    assert reply.timing.total_ms >= reply.timing.compute_ms > 0


async def test_original_resolution_uint8_and_overlay(camserve_server: Any) -> None:
    async with grpc.aio.insecure_channel(camserve_server.address) as channel:
        reply = await pb_grpc.ExplainServiceStub(channel).Explain(
            pb.ExplainRequest(
                images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(top_k=2))],
                output=pb.OutputOptions(dtype=pb.DTYPE_UINT8, overlay=True),
            )
        )
    (result,) = reply.results
    assert len(result.heatmaps) == 2  # top-2 classes, one Grad-CAM each
    array = from_proto(result.heatmaps[0].data)
    assert array.dtype == np.uint8
    assert array.shape == (300, 451)
    # The input-resolution map's peak (255) resampled onto the original: it may fall between
    # samples, and it is not stretched back to 255 (see the test below).
    assert 250 <= array.max() <= 255
    overlay = Image.open(io.BytesIO(result.overlay_png))
    assert overlay.format == "PNG"
    assert overlay.size == (451, 300)


async def test_original_resolution_and_overlay_are_the_input_heatmap_resampled(
    camserve_server: Any,
) -> None:
    """One normalisation at every resolution: the heatmap over the original image is the
    input-resolution heatmap (already in [0, 1]) mapped back, zeros outside the crop, and the
    overlay draws exactly that map. LayerCAM and Grad-CAM++ maps of this image stay well above
    zero inside the crop, so normalising again over the whole original would show."""
    picture = seeded_images(1, size=(96, 128), seed=5)[0]
    image = pb.Image(encoded=png_bytes(picture), target=pb.Target(class_indices=[3]))
    methods = [pb.METHOD_LAYERCAM, pb.METHOD_GRADCAMPP, pb.METHOD_GRADCAM]

    async def explain(output: pb.OutputOptions) -> pb.ImageResult:
        async with grpc.aio.insecure_channel(camserve_server.address) as channel:
            reply = await pb_grpc.ExplainServiceStub(channel).Explain(
                pb.ExplainRequest(model="resnet18", images=[image], methods=methods, output=output)
            )
        return reply.results[0]

    def maps(result: pb.ImageResult) -> np.ndarray:
        return np.stack([from_proto(heatmap.data) for heatmap in result.heatmaps])

    at_input = maps(await explain(pb.OutputOptions(resolution=pb.RESOLUTION_INPUT)))
    original = maps(await explain(pb.OutputOptions()))
    with_overlay = await explain(pb.OutputOptions(dtype=pb.DTYPE_UINT8, overlay=True))
    as_uint8 = maps(with_overlay)
    assert np.all(at_input.min(axis=(1, 2)) == 0.0)
    assert np.all(at_input.max(axis=(1, 2)) == 1.0)
    # 96x128 resized to 256x341, centre crop 224 at (16, 58).
    geometry = prepare(
        Image.fromarray(picture),
        InputRecipe(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        keep_original=False,
    ).geometry
    expected = onto_original_float64(at_input, geometry, (96, 128))
    assert original.shape == (3, 96, 128)
    np.testing.assert_allclose(original, expected, atol=1e-4)
    assert np.abs(as_uint8.astype(int) - np.rint(255 * expected)).max() <= 1
    drawn = Image.open(io.BytesIO(with_overlay.overlay_png))
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(overlay(picture, as_uint8[0])))


def engine_reference(weights: Any, image: bytes, row: RowRequest) -> dict[tuple[str, int], Any]:
    """What the engine itself gives for one image, shaped as the server shapes it."""
    engine = CamEngine(seeded_model("resnet18"))
    recipe = InputRecipe(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    prepared = prepare(Image.open(io.BytesIO(image)).convert("RGB"), recipe, keep_original=False)
    (result,) = engine.explain_batch(prepared.tensor[None], [row])
    return {
        key: shape_heatmaps(value[None], prepared.geometry, "original")[0]
        for key, value in result.maps.items()
    }


async def test_concurrent_single_image_callers_each_get_their_own_result(
    camserve_server: Any, resnet18_weights: Any
) -> None:
    images = seeded_images(32, size=(96, 128))
    targets = [pb.Target(class_indices=[(7 * i) % 1000]) for i in range(32)]
    batches_before = camserve_server.metric("camserve_batch_size_count", model="resnet18")
    images_before = camserve_server.metric("camserve_images_total", model="resnet18")
    async with grpc.aio.insecure_channel(camserve_server.address) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        replies = await asyncio.gather(
            *(
                explain(
                    pb.ExplainRequest(
                        model="resnet18", images=[pb.Image(encoded=png_bytes(image), target=target)]
                    )
                )
                for image, target in zip(images, targets, strict=True)
            )
        )
    batches = camserve_server.metric("camserve_batch_size_count", model="resnet18") - batches_before
    computed = camserve_server.metric("camserve_images_total", model="resnet18") - images_before
    assert computed == 32
    assert batches < 32, "concurrent callers should share batches"
    assert max(reply.batch_size for reply in replies) > 1
    for i in (0, 13, 31):  # exact equality with the engine, for a sample of callers
        (heatmap,) = replies[i].results[0].heatmaps
        assert heatmap.class_index == targets[i].class_indices[0]
        expected = engine_reference(
            resnet18_weights,
            png_bytes(images[i]),
            RowRequest(layer="layer4", classes=(heatmap.class_index,)),
        )[("gradcam", heatmap.class_index)]
        np.testing.assert_allclose(from_proto(heatmap.data), expected, atol=1e-5)


BAD_REQUESTS: list[tuple[str, pb.ExplainRequest, grpc.StatusCode, str]] = [
    (
        "unknown model",
        pb.ExplainRequest(model="nope", images=[pb.Image(encoded=CAT_BYTES)]),
        grpc.StatusCode.NOT_FOUND,
        "model",
    ),
    ("no images", pb.ExplainRequest(), grpc.StatusCode.INVALID_ARGUMENT, "images"),
    (
        "unknown layer",
        pb.ExplainRequest(layer="layer9", images=[pb.Image(encoded=CAT_BYTES)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer",
    ),
    (
        "unknown method",
        pb.ExplainRequest(methods=[42], images=[pb.Image(encoded=CAT_BYTES)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "methods[0]",
    ),
    (
        "class out of range",
        pb.ExplainRequest(
            images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(class_indices=[1000]))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0].target.class_indices[0]",
    ),
    (
        "unknown label",
        pb.ExplainRequest(
            images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(class_labels=["dragon"]))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "class_labels[0]",
    ),
    (
        "top-k zero",
        pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(top_k=0))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k",
    ),
    (
        "undecodable",
        pb.ExplainRequest(images=[pb.Image(encoded=b"hello, not a picture")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0].encoded",
    ),
    (
        "wrong byte length",
        pb.ExplainRequest(
            images=[
                pb.Image(tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[8, 8, 3], data=b"\x00" * 10))
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0].tensor.data",
    ),
    (
        "NaN tensor",
        pb.ExplainRequest(
            images=[pb.Image(tensor=to_proto(np.full((3, 224, 224), np.nan, dtype=np.float32)))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    (
        "too many pixels",
        pb.ExplainRequest(
            model="resnet18",
            images=[pb.Image(encoded=png_bytes(np.zeros((300, 300, 3), dtype=np.uint8)))],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pixels",
    ),
]


@pytest.fixture(scope="module")
def limited_server() -> Any:
    """A server with a small pixel limit, shared by the validation table."""
    server = ServerThread(
        Settings(
            port=0,
            metrics_port=-1,
            http_port=0,
            limits=LimitsSettings(max_pixels=50_000),
            models=(
                ModelSettings(name="efficientnet-lite0", source="builtin:efficientnet-lite0"),
                ModelSettings(
                    name="resnet18",
                    source=gated_model.SOURCE,
                    labels="",
                ),
            ),
        )
    )
    yield server
    server.stop(grace=1.0)


@pytest.mark.parametrize(
    ("case", "request_", "code", "field"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_requests_get_a_precise_status_naming_the_field(
    limited_server: Any, case: str, request_: pb.ExplainRequest, code: grpc.StatusCode, field: str
) -> None:
    del case
    async with grpc.aio.insecure_channel(limited_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pb_grpc.ExplainServiceStub(channel).Explain(request_)
    assert failure.value.code() == code
    assert field in (failure.value.details() or "")
