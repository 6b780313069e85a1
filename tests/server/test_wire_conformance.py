"""Real answers of a real server, read byte by byte: every singular field occurs once.

The server splices large heatmap and overlay bytes into its answers (`camserve.server.wire`);
these tests take the raw bytes off the wire (no deserializer) and walk them at every nesting level
(`tests/_support/wire_walk.py`), for unary calls and streams, overlays, scores and curves, several
images and several classes, every output dtype and resolution, and a stream's error answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import from_proto, to_proto
from tests._support.servers import CAT_BYTES, COFFEE_BYTES, seeded_images
from tests._support.wire_walk import WireViolation, walk

SERVICE = "/camserve.v1.ExplainService/"
RESPONSE = pb.ExplainResponse.DESCRIPTOR
EVERY_SCORE = [pb.SCORE_CONFIDENCE_CHANGE, pb.SCORE_DELETION_AUC, pb.SCORE_INSERTION_AUC]


@pytest.fixture(scope="module")
def channel(camserve_server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        camserve_server.address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as opened:
        yield opened


def raw_unary(channel: grpc.Channel, method: str, request: Any) -> bytes:
    call = channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString)
    return bytes(call(request, timeout=120))


def scored_request() -> pb.ExplainRequest:
    """Two photos, two classes each, two methods, float16 at the original size, an overlay, and
    every score with its curves."""
    return pb.ExplainRequest(
        images=[
            pb.Image(encoded=CAT_BYTES, target=pb.Target(top_k=2)),
            pb.Image(encoded=COFFEE_BYTES, target=pb.Target(top_k=2)),
        ],
        methods=[pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM],
        output=pb.OutputOptions(
            dtype=pb.DTYPE_FLOAT16,
            resolution=pb.RESOLUTION_ORIGINAL,
            overlay=True,
            scores=EVERY_SCORE,
            score_steps=4,
            score_curves=True,
        ),
        request_id="scored",
    )


def tensor_request(resolution: int, dtype: int, raw: bool) -> pb.ExplainRequest:
    """resnet18 with a photo, a uint8 HxWx3 tensor and a normalised float32 tensor, explicit
    classes."""
    pixels = seeded_images(1, size=(80, 120))[0]
    normalised = np.random.default_rng(3).standard_normal((3, 224, 224)).astype(np.float32)
    target = pb.Target(class_indices=[1, 2])
    output = pb.OutputOptions(resolution=resolution, dtype=dtype, raw=raw)
    if resolution == pb.RESOLUTION_EXPLICIT:
        output.height, output.width = 17, 29
    return pb.ExplainRequest(
        model="resnet18",
        images=[
            pb.Image(encoded=CAT_BYTES, target=target),
            pb.Image(tensor=to_proto(pixels), target=target),
            pb.Image(tensor=to_proto(normalised), target=target),
        ],
        methods=[pb.METHOD_HIRESCAM, pb.METHOD_EIGENCAM],
        output=output,
        top_predictions=3,
    )


def assert_every_heatmap_whole(answer: pb.ExplainResponse, maps_per_image: int) -> None:
    for result in answer.results:
        assert len(result.heatmaps) == maps_per_image
        for heatmap in result.heatmaps:
            values = from_proto(heatmap.data).astype(np.float32)
            assert values.ndim == 2
            assert values.size > 0


def test_a_scored_answer_with_overlays_has_each_singular_field_once(channel: grpc.Channel) -> None:
    data = raw_unary(channel, "Explain", scored_request())
    report = walk(data, RESPONSE)
    answer = pb.ExplainResponse.FromString(data)
    assert_every_heatmap_whole(answer, maps_per_image=4)
    heatmaps = "ExplainResponse.results.heatmaps"
    assert report.paths["ExplainResponse.results"] == 2
    assert report.paths[f"{heatmaps}.data"] == 8
    assert report.paths[f"{heatmaps}.data.data"] == 8
    assert report.paths[f"{heatmaps}.data.shape"] == 8
    assert report.paths[f"{heatmaps}.deletion_curve"] == 8
    assert report.paths[f"{heatmaps}.insertion_curve"] == 8
    assert report.paths[f"{heatmaps}.confidence_change"] == 8
    assert report.paths["ExplainResponse.results.overlay_png"] == 2
    assert report.paths["ExplainResponse.timing"] == 1
    # Every map is at its photo's size, in the dtype asked for.
    assert from_proto(answer.results[0].heatmaps[0].data).shape == (300, 451)
    assert answer.results[0].heatmaps[0].data.dtype == pb.DTYPE_FLOAT16


@pytest.mark.parametrize(
    ("resolution", "dtype", "raw"),
    [
        (pb.RESOLUTION_INPUT, pb.DTYPE_UINT8, False),
        (pb.RESOLUTION_FEATURE_MAP, pb.DTYPE_FLOAT32, True),
        (pb.RESOLUTION_EXPLICIT, pb.DTYPE_FLOAT16, False),
    ],
)
def test_tensor_inputs_at_every_resolution_and_dtype(
    channel: grpc.Channel, resolution: int, dtype: int, raw: bool
) -> None:
    data = raw_unary(channel, "Explain", tensor_request(resolution, dtype, raw))
    report = walk(data, RESPONSE)
    assert_every_heatmap_whole(pb.ExplainResponse.FromString(data), maps_per_image=4)
    assert report.paths["ExplainResponse.results.heatmaps.data.data"] == 12
    assert report.paths["ExplainResponse.results.predictions"] == 9


def test_a_stream_of_answers_and_refusals_is_conformant(channel: grpc.Channel) -> None:
    good = tensor_request(pb.RESOLUTION_INPUT, pb.DTYPE_FLOAT32, False)
    bad = pb.ExplainRequest(model="no-such-model", images=[pb.Image(encoded=CAT_BYTES)])
    requests = [good, bad, scored_request()]
    for index, request in enumerate(requests):
        request.request_id = f"r{index}"
    call = channel.stream_stream(
        SERVICE + "ExplainStream", request_serializer=pb.ExplainRequest.SerializeToString
    )
    answers = {}
    for data in call(iter(requests), timeout=180):
        walk(bytes(data), RESPONSE)
        answer = pb.ExplainResponse.FromString(bytes(data))
        answers[answer.request_id] = answer
    assert sorted(answers) == ["r0", "r1", "r2"]
    assert answers["r1"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not answers["r1"].results
    assert_every_heatmap_whole(answers["r0"], maps_per_image=4)
    assert_every_heatmap_whole(answers["r2"], maps_per_image=4)


def test_model_descriptions_are_conformant(channel: grpc.Channel) -> None:
    listed = raw_unary(channel, "ListModels", pb.ListModelsRequest())
    report = walk(listed, pb.ListModelsResponse.DESCRIPTOR)
    assert report.paths["ListModelsResponse.models"] == 2
    for name in ("efficientnet-lite0", "resnet18"):
        walk(raw_unary(channel, "GetModel", pb.GetModelRequest(name=name)), pb.ModelInfo.DESCRIPTOR)


def test_the_walker_refuses_a_singular_message_field_written_twice() -> None:
    """The form the server once wrote: the Tensor's dtype and shape, then its bytes in a second
    occurrence of `Heatmap.data`, which Python's parser merges and protobuf.js replaces."""
    header = pb.Heatmap(data=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 2])).SerializeToString()
    bytes_only = pb.Heatmap(data=pb.Tensor(data=b"\x01\x02")).SerializeToString()
    twice = header + bytes_only
    assert from_proto(pb.Heatmap.FromString(twice).data).shape == (1, 2)  # Python merges
    with pytest.raises(WireViolation, match=r"Heatmap\.data: singular field occurs 2 times"):
        walk(twice, pb.Heatmap.DESCRIPTOR)
    with pytest.raises(WireViolation, match="comes after"):
        walk(pb.Tensor(data=b"x").SerializeToString() + b"\x08\x01", pb.Tensor.DESCRIPTOR)
