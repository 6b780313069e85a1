"""Spliced serialisation (`camserve.server.wire`) parses exactly as protobuf's own."""

from __future__ import annotations

import numpy as np

from camserve.server import messages
from camserve.server.records import (
    ExplainOutcome,
    FeatureMapResult,
    GateResult,
    HeatmapResult,
    ImageExplanation,
    Prediction,
    StageTimes,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.tensors import from_proto, to_proto

RNG = np.random.default_rng(7)
ARRAYS = (
    RNG.random((3, 5), dtype=np.float32),
    RNG.random((2, 4), dtype=np.float32).astype(np.float16),
    RNG.integers(0, 256, (7, 3), dtype=np.uint8),
    np.zeros((0, 4), dtype=np.float32),
    RNG.random((600, 1100), dtype=np.float32),  # 2.6 MB: lengths take four varint bytes
)

FEATURE_MAPS = (
    FeatureMapResult("conv1", ARRAYS[0][None], (3,), (0.5, -1.0, 2.0), (1.0, 0.0, 4.0)),
    FeatureMapResult("layer1", ARRAYS[2][None], (0,), (0.25,), (0.75,)),
)
GATES = (
    GateResult("se.scale", "channel", RNG.random(6, dtype=np.float32)),
    GateResult("cbam.spatial", "spatial", RNG.random((4, 5), dtype=np.float32)),
)
SCORES = {"confidence_change": -0.5, "deletion_auc": 0.25, "insertion_auc": 0.75}
CURVES = {"deletion_auc": (1.0, 0.5, 0.125), "insertion_auc": (0.0, 0.25, 1.0)}


def outcome() -> ExplainOutcome:
    images = []
    for first in range(2):
        heatmaps = tuple(
            HeatmapResult(
                method="gradcam" if index % 2 else "scorecam",
                class_index=index,
                class_label=f"class {index}",
                layer="layer4",
                data=array,
                scores=SCORES if index == 1 else {},
                curves=CURVES if index == 1 else {},
            )
            for index, array in enumerate(ARRAYS[first:])
        )
        images.append(
            ImageExplanation(
                predictions=(Prediction(1, "class 1", 0.75, 2.5),),
                heatmaps=heatmaps,
                overlay_png=b"\x89PNG" * first,
                feature_maps=FEATURE_MAPS[first:],
                gates=GATES[first:],
            )
        )
    return ExplainOutcome("tiny", "2", tuple(images), StageTimes(0.001, 0.002, 0.003, 0.01), 4)


def built_by_protobuf(request_id: str, answer: ExplainOutcome) -> pb.ExplainResponse:
    """The same answer assembled the ordinary way, field by field."""
    times = answer.times
    return pb.ExplainResponse(
        request_id=request_id,
        model=answer.model,
        model_version=answer.model_version,
        timing=pb.Timing(
            queue_ms=1000 * times.queue_s,
            preprocess_ms=1000 * times.preprocess_s,
            compute_ms=1000 * times.compute_s,
            total_ms=1000 * times.total_s,
        ),
        batch_size=answer.batch_size,
        results=[
            pb.ImageResult(
                predictions=[
                    pb.Prediction(
                        index=p.index, label=p.label, probability=p.probability, logit=p.logit
                    )
                    for p in image.predictions
                ],
                heatmaps=[
                    pb.Heatmap(
                        method=METHOD_BY_NAME[h.method],  # type: ignore[arg-type]
                        class_index=h.class_index,
                        class_label=h.class_label,
                        layer=h.layer,
                        data=to_proto(h.data),
                        confidence_change=h.scores.get("confidence_change"),
                        deletion_auc=h.scores.get("deletion_auc"),
                        insertion_auc=h.scores.get("insertion_auc"),
                        deletion_curve=h.curves.get("deletion_auc", ()),
                        insertion_curve=h.curves.get("insertion_auc", ()),
                    )
                    for h in image.heatmaps
                ],
                overlay_png=image.overlay_png,
                feature_maps=[
                    pb.FeatureMap(
                        layer=f.layer,
                        data=to_proto(f.data),
                        channels=f.channels,
                        channel_means=f.means,
                        channel_maxes=f.maxes,
                    )
                    for f in image.feature_maps
                ],
                gates=[
                    pb.GateValues(
                        name=g.name, kind=messages.GATE_KINDS[g.kind], data=to_proto(g.data)
                    )
                    for g in image.gates
                ],
            )
            for image in answer.images
        ],
    )


def test_spliced_answer_is_byte_for_byte_protobufs_own_serialisation() -> None:
    answer = outcome()
    sent = messages.encoded_response("r-1", answer).data
    expected = built_by_protobuf("r-1", answer)
    # Equal bytes: every message once, fields in number order, exactly as protobuf writes them.
    assert sent == expected.SerializeToString(deterministic=True)
    parsed = pb.ExplainResponse.FromString(sent)
    assert parsed == expected
    for image, result in zip(answer.images, parsed.results, strict=True):
        for heatmap, wire in zip(image.heatmaps, result.heatmaps, strict=True):
            np.testing.assert_array_equal(from_proto(wire.data), heatmap.data)
            assert from_proto(wire.data).dtype == heatmap.data.dtype


def test_non_contiguous_and_big_endian_arrays_travel_little_endian_in_c_order() -> None:
    base = RNG.random((6, 8), dtype=np.float32)
    for array in (base.T, base.astype(">f4")):
        answer = ExplainOutcome(
            "tiny",
            "2",
            (ImageExplanation((), (HeatmapResult("gradcam", 0, "c", "l", array),), b""),),
            StageTimes(0, 0, 0, 0),
            1,
        )
        wire = pb.ExplainResponse.FromString(messages.encoded_response("r", answer).data)
        np.testing.assert_array_equal(from_proto(wire.results[0].heatmaps[0].data), array)


def test_the_split_points_cover_every_field_of_the_spliced_messages() -> None:
    """wire.py writes each spliced message as protobuf-serialised pieces around its large fields,
    split by field number; a field added to one of these messages must be placed there too."""
    fields = {
        message.DESCRIPTOR.name: [f.name for f in message.DESCRIPTOR.fields]
        for message in (pb.ExplainResponse, pb.ImageResult, pb.Heatmap, pb.Tensor)
    }
    assert fields["ExplainResponse"][3] == "results"  # head: request_id, model, model_version
    # The tail after overlay_png is serialised by protobuf (wire.ImagePart.tail).
    assert fields["ImageResult"][:3] == ["predictions", "heatmaps", "overlay_png"]
    assert fields["Heatmap"][4] == "data"  # head: method, class_index, class_label, layer
    assert fields["Tensor"] == ["dtype", "shape", "data"]
    for message in (pb.ExplainResponse, pb.ImageResult, pb.Heatmap, pb.Tensor):
        numbers = [f.number for f in message.DESCRIPTOR.fields]
        assert numbers == sorted(numbers), f"{message.DESCRIPTOR.name} fields out of order"
