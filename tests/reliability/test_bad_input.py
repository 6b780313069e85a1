"""Malformed requests against a live server, each sent while good traffic keeps flowing: the one
table of bad requests run against a real server.

Every bad request must get a precise status whose message starts with the offending field, and
none may disturb the good requests running beside it on the same server: they keep getting the
same, correct answers, and the server stays SERVING.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve.server.settings import LimitsSettings, Settings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import to_proto
from tests._support.servers import CAT_BYTES, ServerThread, png16_bytes, png_bytes, seeded_images
from tests._support.traffic import (
    SERVING,
    TINY_CLASSES,
    GoodTraffic,
    assert_same_explanation,
    encoded,
    health_status,
    png_declaring,
    small_resnet,
    tiny_model,
)

pytestmark = pytest.mark.timeout(120)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_IMAGES = 4
GOOD_IMAGE = png_bytes(seeded_images(1, size=(64, 64), seed=1)[0])
# The background traffic shares batches with these calls, and a batch of another size may take
# another float32 convolution algorithm: maps agree to a few 1e-6, not bit for bit.
BATCHED_ATOL = 1e-5
SMALL = seeded_images(1, size=(48, 40), seed=2)[0]
SMALL_PNG = png_bytes(SMALL)
SMALL_JPEG = encoded(SMALL, "JPEG", quality=90)
GOOD_REQUEST = pb.ExplainRequest(
    model="resnet18",
    images=[pb.Image(encoded=GOOD_IMAGE, target=pb.Target(top_k=2))],
    methods=[pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM],
    output=pb.OutputOptions(resolution=pb.RESOLUTION_INPUT),
)


def _corrupt_idat(png: bytes) -> bytes:
    """The PNG with bytes of its compressed pixel data flipped (chunk CRCs left stale)."""
    start = png.index(b"IDAT") + 6
    data = bytearray(png)
    for i in range(start, start + 24):
        data[i] ^= 0x5A
    return bytes(data)


def _corrupt_jpeg_body(jpeg: bytes) -> bytes:
    """The JPEG with its entropy-coded data overwritten by marker bytes."""
    start = jpeg.index(b"\xff\xda") + 20
    data = bytearray(jpeg)
    for i in range(start, len(data) - 2, 7):
        data[i] = 0xFF
    return bytes(data)


def image(data: bytes = SMALL_PNG, **target: object) -> pb.Image:
    return pb.Image(encoded=data, target=pb.Target(**target))  # type: ignore[arg-type]


def tensor_image(dtype: int, shape: list[int], data: bytes) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))  # type: ignore[arg-type]


def request(*images: pb.Image, model: str = "resnet18", **fields: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, images=list(images), **fields)  # type: ignore[arg-type]


def explicit(height: int, width: int, **options: object) -> pb.OutputOptions:
    return pb.OutputOptions(
        resolution=pb.RESOLUTION_EXPLICIT,
        height=height,
        width=width,
        **options,  # type: ignore[arg-type]
    )


def with_id(message: pb.ExplainRequest, request_id: str) -> pb.ExplainRequest:
    copy = pb.ExplainRequest()
    copy.CopyFrom(message)
    copy.request_id = request_id
    return copy


@dataclass(frozen=True)
class Case:
    """A malformed request, its expected status, and what the message must start with."""

    id: str
    request: pb.ExplainRequest
    code: grpc.StatusCode
    field: str  # the message starts with this field path ("" when gRPC itself answers)
    fragment: str = ""  # and contains this


FLOAT_64 = np.zeros((3, 64, 64), dtype=np.float32)
NAN_64 = FLOAT_64.copy()
NAN_64[1, 10, 20] = np.nan
INF_64 = FLOAT_64.copy()
INF_64[2, 0, 0] = np.inf
TEXT = b"Dear server,\nthis is a letter, not a picture.\n" * 4

CASES: list[Case] = [
    # --- the request as a whole
    Case("empty-request", pb.ExplainRequest(), INVALID, "images", "no images"),
    Case("no-images", request(model="tiny"), INVALID, "images", "no images"),
    Case("unknown-model", request(image(), model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    Case(
        "unknown-model-without-images",
        request(model="resnet-9000"),
        grpc.StatusCode.NOT_FOUND,
        "model",
        "available: resnet18, tiny",
    ),
    Case(
        "too-many-images",
        request(*[image()] * (MAX_IMAGES + 1)),
        INVALID,
        "images",
        f"limit of {MAX_IMAGES}",
    ),
    Case(
        "over-message-size",
        request(image(b"\x00" * (2 * 1024 * 1024))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
        "larger than max",
    ),
    # --- layer and methods
    Case("unknown-layer", request(image(), layer="layer9"), INVALID, "layer", "layer9"),
    Case("non-spatial-layer", request(image(), layer="fc"), INVALID, "layer"),
    Case("method-42", request(image(), methods=[42]), INVALID, "methods[0]", "42"),
    Case("method-negative", request(image(), methods=[-1]), INVALID, "methods[0]"),
    Case("second-method-bad", request(image(), methods=[1, 99]), INVALID, "methods[1]"),
    # --- targets
    Case(
        "unknown-label",
        request(image(class_labels=["dragon"])),
        INVALID,
        "images[0].target.class_labels[0]",
    ),
    Case(
        "class-negative",
        request(image(class_indices=[-1])),
        INVALID,
        "images[0].target.class_indices[0]",
        "out of range",
    ),
    Case(
        "class-equal-to-count",
        request(image(class_indices=[1000])),
        INVALID,
        "images[0].target.class_indices[0]",
        "0..999",
    ),
    Case(
        "class-above-count-tiny",
        request(image(class_indices=[3, TINY_CLASSES]), model="tiny"),
        INVALID,
        "images[0].target.class_indices[1]",
    ),
    Case(
        "second-image-bad-class",
        request(image(), image(class_indices=[2**31 - 1])),
        INVALID,
        "images[1].target.class_indices[0]",
    ),
    Case("top-k-zero", request(image(top_k=0)), INVALID, "images[0].target.top_k", "1..20"),
    Case("top-k-over-limit", request(image(top_k=21)), INVALID, "images[0].target.top_k"),
    Case(
        "top-k-over-class-count",
        request(image(top_k=TINY_CLASSES + 1), model="tiny"),
        INVALID,
        "images[0].target.top_k",
        f"1..{TINY_CLASSES}",
    ),
    Case(
        "top-k-with-classes",
        request(image(top_k=1, class_indices=[1])),
        INVALID,
        "images[0].target.top_k",
        "not both",
    ),
    Case(
        "too-many-classes",
        request(image(class_indices=list(range(21)))),
        INVALID,
        "images[0].target",
        "at most 20",
    ),
    Case("top-predictions-zero", request(image(), top_predictions=0), INVALID, "top_predictions"),
    Case(
        "top-predictions-over-count",
        request(image(), model="tiny", top_predictions=TINY_CLASSES + 1),
        INVALID,
        "top_predictions",
    ),
    # --- encoded images
    Case("image-without-source", request(pb.Image()), INVALID, "images[0]", "set `encoded`"),
    Case("empty-bytes", request(image(b"")), INVALID, "images[0].encoded", "empty"),
    Case(
        "truncated-jpeg",
        request(image(CAT_BYTES[: len(CAT_BYTES) // 2])),
        INVALID,
        "images[0].encoded",
        "truncated",
    ),
    Case(
        "truncated-png",
        request(image(SMALL_PNG[: len(SMALL_PNG) // 2])),
        INVALID,
        "images[0].encoded",
        "truncated",
    ),
    Case(
        "jpeg-header-only",
        request(image(SMALL_JPEG[: SMALL_JPEG.index(b"\xff\xda")])),
        INVALID,
        "images[0].encoded",
    ),
    Case(
        "corrupt-jpeg-body",
        request(image(_corrupt_jpeg_body(SMALL_JPEG))),
        INVALID,
        "images[0].encoded",
    ),
    Case(
        "corrupt-png-data", request(image(_corrupt_idat(SMALL_PNG))), INVALID, "images[0].encoded"
    ),
    Case(
        "jpeg-magic-then-garbage",
        request(image(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)),
        INVALID,
        "images[0].encoded",
    ),
    Case("png-signature-only", request(image(SMALL_PNG[:8])), INVALID, "images[0].encoded"),
    Case("text-file", request(image(TEXT)), INVALID, "images[0].encoded", "not a decodable"),
    Case("gif-not-accepted", request(image(encoded(SMALL, "GIF"))), INVALID, "images[0].encoded"),
    Case("bmp-not-accepted", request(image(encoded(SMALL, "BMP"))), INVALID, "images[0].encoded"),
    Case(
        "one-pixel-png",
        request(image(png_bytes(np.zeros((1, 1, 3), dtype=np.uint8)))),
        INVALID,
        "images[0].encoded",
        "1x1",
    ),
    Case(
        "thin-png-in-third-image",
        request(image(), image(), image(png_bytes(np.zeros((100, 4, 3), dtype=np.uint8)))),
        INVALID,
        "images[2].encoded",
        ">= 8",
    ),
    Case(
        "decompression-bomb",
        request(image(png_declaring(30_000, 30_000))),
        INVALID,
        "images[0].encoded",
        "pixels",
    ),
    Case(
        "over-pixel-limit",
        request(image(png_declaring(8_000, 6_000))),
        INVALID,
        "images[0].encoded",
        "48000000 pixels",
    ),
    Case(
        "extreme-aspect-8x4000",
        request(image(png_bytes(np.zeros((8, 4_000, 3), dtype=np.uint8)))),
        INVALID,
        "images[0].encoded",
        "image is 4000x8, an aspect ratio of 500.0:1, over the limit of 20:1; crop or pad",
    ),
    Case(
        "extreme-aspect-40000x8-in-second-image",
        request(image(), image(png_bytes(np.zeros((40_000, 8, 3), dtype=np.uint8)))),
        INVALID,
        "images[1].encoded",
        "image is 8x40000, an aspect ratio of 5000.0:1, over the limit of 20:1",
    ),
    Case(
        "extreme-aspect-refused-from-the-header",  # the pixels are missing: never decoded
        request(image(png_declaring(8, 4_000))),
        INVALID,
        "images[0].encoded",
        "aspect ratio of 500.0:1",
    ),
    # --- raw tensors
    Case(
        "float16-tensor",
        request(pb.Image(tensor=to_proto(FLOAT_64, pb.DTYPE_FLOAT16))),
        INVALID,
        "images[0].tensor.dtype",
        "DTYPE_FLOAT16",
    ),
    Case(
        "uint8-rank-2",
        request(tensor_image(pb.DTYPE_UINT8, [64, 64], b"\x00" * 64 * 64)),
        INVALID,
        "images[0].tensor",
        "HxWx3",
    ),
    Case(
        "uint8-four-channels",
        request(tensor_image(pb.DTYPE_UINT8, [16, 16, 4], b"\x00" * 16 * 16 * 4)),
        INVALID,
        "images[0].tensor",
        "HxWx3",
    ),
    Case(
        "uint8-one-pixel",
        request(tensor_image(pb.DTYPE_UINT8, [1, 1, 3], b"\x00" * 3)),
        INVALID,
        "images[0].tensor",
        ">= 8",
    ),
    Case(
        "float32-rank-2",
        request(pb.Image(tensor=to_proto(FLOAT_64[0]))),
        INVALID,
        "images[0].tensor",
        "3x64x64",
    ),
    Case(
        "float32-wrong-size",
        request(pb.Image(tensor=to_proto(np.zeros((3, 32, 32), dtype=np.float32)))),
        INVALID,
        "images[0].tensor",
        "3x64x64",
    ),
    Case(
        "shape-byte-length-mismatch",
        request(tensor_image(pb.DTYPE_FLOAT32, [3, 64, 64], b"\x00" * 100)),
        INVALID,
        "images[0].tensor.data",
        "holds 100 bytes",
    ),
    Case(
        "uint8-shape-byte-length-mismatch",
        request(tensor_image(pb.DTYPE_UINT8, [8, 8, 3], b"\x00" * 10)),
        INVALID,
        "images[0].tensor.data",
        "holds 10 bytes",
    ),
    Case(
        "default-model-nan-tensor",  # no model named: the server's first model refuses it
        pb.ExplainRequest(images=[pb.Image(tensor=to_proto(NAN_64))]),
        INVALID,
        "images[0].tensor",
        "NaN",
    ),
    Case(
        "negative-dimension",
        request(tensor_image(pb.DTYPE_UINT8, [-8, -8, 3], b"\x00" * 192)),
        INVALID,
        "images[0].tensor.shape",
        "negative",
    ),
    Case(
        "nan-tensor",
        request(pb.Image(tensor=to_proto(NAN_64))),
        INVALID,
        "images[0].tensor",
        "NaN",
    ),
    Case(
        "inf-tensor",
        request(image(), pb.Image(tensor=to_proto(INF_64))),
        INVALID,
        "images[1].tensor",
        "Inf",
    ),
    # --- output options
    Case("explicit-0x0", request(image(), output=explicit(0, 0)), INVALID, "output.height/width"),
    Case("explicit-0x16", request(image(), output=explicit(0, 16)), INVALID, "output.height/width"),
    Case(
        "explicit-absurd",
        request(image(), output=explicit(100_000, 100_000)),
        INVALID,
        "output.height/width",
        "over the limit",
    ),
    Case(
        "explicit-uint32-max",
        request(image(), output=explicit(2**32 - 1, 2**32 - 1)),
        INVALID,
        "output.height/width",
    ),
    Case(
        "size-without-explicit",
        request(image(), output=pb.OutputOptions(height=10, width=10)),
        INVALID,
        "output.height/width",
    ),
    Case(
        "unknown-resolution",
        request(image(), output=pb.OutputOptions(resolution=9)),  # type: ignore[arg-type]
        INVALID,
        "output.resolution",
        "9",
    ),
    Case(
        "unknown-output-dtype",
        request(image(), output=pb.OutputOptions(dtype=7)),  # type: ignore[arg-type]
        INVALID,
        "output.dtype",
    ),
    Case(
        "uint8-with-raw",
        request(image(), output=pb.OutputOptions(dtype=pb.DTYPE_UINT8, raw=True)),
        INVALID,
        "output.dtype",
        "raw",
    ),
]


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "frontends-2"])
def server(resnet18_weights: Path, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """One server per process layout: a 1 MB message limit and at most 4 images per request."""
    running = ServerThread(
        Settings(
            frontends=request.param,
            port=0,
            metrics_port=-1,
            http_port=0,
            max_message_mb=1,
            limits=LimitsSettings(max_images_per_request=MAX_IMAGES),
            models=(small_resnet(resnet18_weights), tiny_model()),
        )
    )
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def traffic(server: ServerThread) -> Iterator[GoodTraffic]:
    """Good requests flowing for the whole module, each answer checked against a reference."""
    with GoodTraffic(server.address, GOOD_REQUEST) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.ExplainServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainServiceStub(channel)


def test_the_table_covers_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request_gets_a_precise_status_naming_the_field(
    stub: pb_grpc.ExplainServiceStub, traffic: GoodTraffic, case: Case
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Explain(case.request, timeout=30)
    error: grpc.Call = refused.value  # type: ignore[assignment]
    message = error.details() or ""
    assert error.code() == case.code, message
    assert message.startswith(case.field), message
    assert case.fragment in message
    traffic.wait_for_more(2)
    assert not traffic.failures


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda rgb: Image.fromarray(rgb).convert("L")),
        ("LA", lambda rgb: Image.fromarray(rgb).convert("LA")),
        ("RGBA", lambda rgb: Image.fromarray(np.dstack([rgb, rgb[..., 0]]), mode="RGBA")),
        ("P", lambda rgb: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)),
    ],
)
def test_non_rgb_png_is_accepted_as_its_rgb_conversion(
    stub: pb_grpc.ExplainServiceStub,
    traffic: GoodTraffic,
    mode: str,
    make: Callable[[np.ndarray], Image.Image],
) -> None:
    """Grayscale, alpha and palette PNGs explain exactly like the same picture converted to RGB
    by the caller, on every call."""
    picture = make(SMALL)
    assert picture.mode == mode
    as_sent = request(image(encoded(picture)), top_predictions=3)
    as_rgb = request(image(encoded(picture.convert("RGB"))), top_predictions=3)
    expected = stub.Explain(as_rgb, timeout=30)
    for _ in range(2):
        assert_same_explanation(stub.Explain(as_sent, timeout=30), expected, atol=BATCHED_ATOL)
    traffic.wait_for_more(1)
    assert not traffic.failures


def _with_orientation(picture: Image.Image, kind: str, orientation: int, **save: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(picture, kind, exif=exif, **save)


def _exif_jpeg_and_upright(orientation: int, upright: Image.Transpose) -> tuple[bytes, bytes]:
    """A JPEG stored sideways with its EXIF orientation, and the same pixels physically rotated
    (decoded from the same JPEG data without the tag, so no second compression differs)."""
    stored = Image.fromarray(SMALL)
    tagged = _with_orientation(stored, "JPEG", orientation, quality=90)
    decoded = Image.open(io.BytesIO(encoded(stored, "JPEG", quality=90))).convert("RGB")
    return tagged, png_bytes(np.asarray(decoded.transpose(upright)))


SMALL_16 = SMALL.astype(np.uint16) * 257  # the same picture in 16 bits (255 -> 65535)


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param(
            png16_bytes(SMALL_16[..., 1]),
            png_bytes(np.repeat(SMALL[..., 1:2], 3, axis=2)),
            id="16-bit-grayscale-png",
        ),
        pytest.param(png16_bytes(SMALL_16), png_bytes(SMALL), id="16-bit-rgb-png"),
        pytest.param(*_exif_jpeg_and_upright(6, Image.Transpose.ROTATE_270), id="exif-6-jpeg"),
        pytest.param(*_exif_jpeg_and_upright(8, Image.Transpose.ROTATE_90), id="exif-8-jpeg"),
        pytest.param(
            _with_orientation(
                Image.fromarray(SMALL).transpose(Image.Transpose.ROTATE_90), "PNG", 6
            ),
            SMALL_PNG,
            id="exif-6-png",
        ),
    ],
)
def test_image_explains_like_the_picture_a_viewer_shows(
    stub: pb_grpc.ExplainServiceStub, traffic: GoodTraffic, sent: bytes, shown: bytes
) -> None:
    """16-bit PNGs are scaled to 8 bits (not clipped to white) and EXIF orientation is applied:
    each file explains exactly like the 8-bit, upright picture, heatmaps at its displayed size."""
    as_sent = request(image(sent), top_predictions=3)
    expected = stub.Explain(request(image(shown), top_predictions=3), timeout=30)
    assert_same_explanation(stub.Explain(as_sent, timeout=30), expected, atol=BATCHED_ATOL)
    traffic.wait_for_more(1)
    assert not traffic.failures


def test_grayscale_jpeg_is_accepted(stub: pb_grpc.ExplainServiceStub) -> None:
    gray = encoded(Image.fromarray(SMALL).convert("L"), "JPEG", quality=95)
    reply = stub.Explain(request(image(gray)), timeout=30)
    assert len(reply.results[0].heatmaps) == 1


def test_stream_answers_garbage_with_errors_and_good_requests_with_results(
    stub: pb_grpc.ExplainServiceStub, traffic: GoodTraffic
) -> None:
    garbage = [
        "empty-request",
        "unknown-model",
        "method-42",
        "class-negative",
        "text-file",
        "truncated-jpeg",
        "decompression-bomb",
        "float16-tensor",
        "nan-tensor",
        "explicit-absurd",
        "unknown-resolution",
    ]
    bad = [case for case in CASES if case.id in garbage]
    assert len(bad) == len(garbage)
    bad_requests = [with_id(case.request, f"bad-{case.id}") for case in bad]
    good_ids = [f"good-{i}" for i in range(4)]
    goods = [with_id(GOOD_REQUEST, good_id) for good_id in good_ids]
    ordered = [*bad_requests, *goods[:3], bad_requests[0], goods[3]]
    replies = list(stub.ExplainStream(iter(ordered), timeout=60))
    assert len(replies) == len(ordered)
    by_id: dict[str, list[pb.ExplainResponse]] = {}
    for reply in replies:
        by_id.setdefault(reply.request_id, []).append(reply)
    for case in bad:
        for reply in by_id[f"bad-{case.id}"]:
            assert reply.error.code == case.code.value[0], reply.error.message
            assert reply.error.message.startswith(case.field), reply.error.message
            assert not reply.results
    for good_id in good_ids:
        (reply,) = by_id[good_id]
        assert not reply.HasField("error")
        assert_same_explanation(reply, traffic.reference)


def test_tensor_with_an_unknown_dtype_names_the_field(stub: pb_grpc.ExplainServiceStub) -> None:
    """Every INVALID_ARGUMENT message starts with the field path; the tensor dtype's does not."""
    with pytest.raises(grpc.RpcError) as refused:
        stub.Explain(request(tensor_image(9, [8, 8, 3], b"\x00" * 192)), timeout=30)
    error: grpc.Call = refused.value  # type: ignore[assignment]
    assert error.code() == INVALID
    assert (error.details() or "").startswith("images[0].tensor"), error.details()


def test_tensor_shape_whose_element_count_overflows_is_invalid_argument(
    stub: pb_grpc.ExplainServiceStub, traffic: GoodTraffic
) -> None:
    """A shape whose element count wraps around int64 to the byte length must be refused as the
    client mistake it is, not crash the handler into UNKNOWN."""
    for shape in ([2**32, 2**32, 3], [2**62, 2**62]):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Explain(request(tensor_image(pb.DTYPE_UINT8, shape, b"")), timeout=30)
        error: grpc.Call = refused.value  # type: ignore[assignment]
        assert error.code() == INVALID, f"{shape}: {error.code()} {error.details()}"
        assert (error.details() or "").startswith("images[0].tensor")
    traffic.wait_for_more(1)
    assert not traffic.failures


def test_largest_heatmap_the_limits_allow_can_be_answered(
    server_factory: object, resnet18_weights: Path
) -> None:
    """With default limits, a single 4096x4096 float32 heatmap (exactly max_output_pixels) is
    accepted by validation; the server must then be able to send it, or refuse it up front
    (INVALID_ARGUMENT naming `output`) without computing anything."""
    limited = server_factory(models=(small_resnet(resnet18_weights),))  # type: ignore[operator]
    side = int(np.sqrt(LimitsSettings().max_output_pixels))
    computed_before = limited.metric("camserve_images_total", model="resnet18")
    options = [("grpc.max_receive_message_length", 512 * 1024 * 1024)]
    with grpc.insecure_channel(limited.address, options=options) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        try:
            reply = explain(request(image(), output=explicit(side, side)), timeout=60)
        except grpc.RpcError as exc:
            error: grpc.Call = exc  # type: ignore[assignment]
            computed = limited.metric("camserve_images_total", model="resnet18") - computed_before
            assert error.code() == INVALID, f"{error.code()}: {error.details()}"
            assert (error.details() or "").startswith("output"), error.details()
            assert computed == 0
        else:
            assert reply.results[0].heatmaps[0].data.shape == [side, side]


def test_server_stays_serving_and_good_traffic_was_never_disturbed(
    server: ServerThread, traffic: GoodTraffic
) -> None:
    traffic.wait_for_more(2)
    assert health_status(server.address) == SERVING
    assert not traffic.failures
    assert traffic.answered >= 2 * len(CASES)
