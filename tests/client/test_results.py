"""Building result dataclasses from hand-made v1 responses."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from camserve.client.results import MethodCost, explanations_from_response, model_from_proto
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import TensorFormatError, to_proto


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap(method: int, class_index: int, array: np.ndarray, label: str = "") -> pb.Heatmap:
    return pb.Heatmap(
        method=method,
        class_index=class_index,
        class_label=label,
        layer="layer4",
        data=to_proto(array),
    )


def response() -> pb.ExplainResponse:
    first = np.arange(6, dtype=np.float32).reshape(2, 3) / 5
    second = np.ones((2, 3), dtype=np.float16)
    third = np.full((4, 5), 200, dtype=np.uint8)
    return pb.ExplainResponse(
        request_id="req-1",
        model="resnet18",
        model_version="3",
        batch_size=4,
        timing=pb.Timing(queue_ms=1.5, preprocess_ms=2.0, compute_ms=10.0, total_ms=14.0),
        results=[
            pb.ImageResult(
                predictions=[
                    pb.Prediction(index=285, label="Egyptian cat", probability=0.5, logit=9.0),
                    pb.Prediction(index=281, label="tabby", probability=0.25, logit=8.0),
                ],
                heatmaps=[
                    heatmap(pb.METHOD_GRADCAM, 285, first, "Egyptian cat"),
                    heatmap(pb.METHOD_LAYERCAM, 285, second, "Egyptian cat"),
                    heatmap(pb.METHOD_GRADCAM, 281, first, "tabby"),
                ],
                overlay_png=png((7, 5)),
            ),
            pb.ImageResult(
                predictions=[pb.Prediction(index=1, label="b", probability=1.0, logit=0.0)],
                heatmaps=[heatmap(pb.METHOD_UNSPECIFIED, 1, third)],
            ),
        ],
    )


def test_one_explanation_per_image_with_the_shared_request_fields() -> None:
    first, second = explanations_from_response(response())
    assert first.predictions[0].index == 285
    assert first.top.label == "Egyptian cat"
    assert first.predictions[1].probability == pytest.approx(0.25)
    assert first.layer == "layer4"
    assert first.class_labels == {285: "Egyptian cat", 281: "tabby"}
    for explanation in (first, second):
        assert explanation.request_id == "req-1"
        assert explanation.model == "resnet18"
        assert explanation.model_version == "3"
        assert explanation.batch_size == 4
        assert explanation.timing.total_ms == pytest.approx(14.0)
        assert explanation.timing.queue_ms == pytest.approx(1.5)
    assert first.overlay is not None
    assert first.overlay.size == (7, 5)
    assert second.overlay is None


def test_heatmaps_are_keyed_by_method_name_and_class_in_wire_order() -> None:
    first, second = explanations_from_response(response())
    assert list(first.heatmaps) == [("gradcam", 285), ("layercam", 285), ("gradcam", 281)]
    assert first.heatmaps[("layercam", 285)].dtype == np.float16
    assert list(second.heatmaps) == [("gradcam", 1)]  # METHOD_UNSPECIFIED means Grad-CAM
    assert second.heatmap().dtype == np.uint8


def test_heatmap_picks_the_first_match() -> None:
    first, _ = explanations_from_response(response())
    np.testing.assert_array_equal(first.heatmap(), first.heatmaps[("gradcam", 285)])
    assert first.heatmap("layercam").dtype == np.float16
    assert first.heatmap(class_index=281) is first.heatmaps[("gradcam", 281)]
    with pytest.raises(KeyError, match="available"):
        first.heatmap("hirescam")


def test_results_are_immutable() -> None:
    first, _ = explanations_from_response(response())
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.model = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        first.heatmaps[("x", 0)] = np.zeros(1)  # type: ignore[index]
    with pytest.raises(ValueError, match="read-only"):
        first.heatmap()[0, 0] = 1


def test_a_corrupt_heatmap_is_refused() -> None:
    bad = response()
    bad.results[0].heatmaps[0].data.data = b"\x00" * 3
    with pytest.raises(TensorFormatError, match=r"results.heatmaps\[0\].data"):
        explanations_from_response(bad)


def scored_response() -> pb.ExplainResponse:
    """Scores on two of three heatmaps, curves on one, as a server sends them."""
    reply = response()
    gradcam, layercam, _ = reply.results[0].heatmaps
    gradcam.confidence_change = -0.5
    gradcam.deletion_auc = 0.0  # a real score of 0: present, not "unset"
    gradcam.insertion_auc = 0.75
    gradcam.deletion_curve.extend([0.5, 0.25, 0.0])
    gradcam.insertion_curve.extend([0.0, 0.5, 0.5])
    layercam.insertion_auc = 0.25
    return pb.ExplainResponse.FromString(reply.SerializeToString())


def test_scores_are_keyed_like_the_heatmaps() -> None:
    first, second = explanations_from_response(scored_response())
    assert dict(first.scores) == {
        ("gradcam", 285): {"confidence_change": -0.5, "deletion_auc": 0.0, "insertion_auc": 0.75},
        ("layercam", 285): {"insertion_auc": 0.25},
    }
    assert set(first.scores) <= set(first.heatmaps)
    assert dict(first.curves) == {
        ("gradcam", 285): {"deletion_auc": (0.5, 0.25, 0.0), "insertion_auc": (0.0, 0.5, 0.5)}
    }
    assert not second.scores  # nothing asked for, nothing there
    assert not second.curves


def test_scores_are_read_only() -> None:
    first, _ = explanations_from_response(scored_response())
    with pytest.raises(TypeError):
        first.scores[("gradcam", 285)]["deletion_auc"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        first.curves[("x", 0)] = {}  # type: ignore[index]


def test_model_info_from_proto() -> None:
    info = pb.ModelInfo(
        name="resnet18",
        version="2",
        device="cpu",
        ready=True,
        input=pb.InputSpec(
            height=224, width=224, resize=256, center_crop=True, mean=[0.5] * 3, std=[0.25] * 3
        ),
        num_classes=3,
        labels=["a", "b", "c"],
        default_layer="layer4",
        layers=[pb.LayerInfo(name="layer4", output_shape=[512, 7, 7])],
        methods=[pb.METHOD_GRADCAM, pb.METHOD_SCORECAM],
        max_batch_size=8,
        method_costs=[
            pb.MethodCost(method=pb.METHOD_GRADCAM, rows_per_image=1, forward_passes=1.0),
            pb.MethodCost(method=pb.METHOD_SCORECAM, rows_per_image=513, forward_passes=513.0),
        ],
    )
    model = model_from_proto(info)
    assert model.name == "resnet18"
    assert model.ready
    assert model.input.height == 224
    assert model.input.center_crop
    assert model.input.mean == (0.5, 0.5, 0.5)
    assert model.labels == ("a", "b", "c")
    assert model.layers[0].name == "layer4"
    assert model.layers[0].output_shape == (512, 7, 7)
    assert model.methods == ("gradcam", "scorecam")
    assert model.max_batch_size == 8
    assert model.method_costs == (
        MethodCost("gradcam", rows_per_image=1, forward_passes=1.0),
        MethodCost("scorecam", rows_per_image=513, forward_passes=513.0),
    )
    assert model.cost("scorecam").forward_passes == 513.0
    with pytest.raises(KeyError, match="known: \\['gradcam', 'scorecam'\\]"):
        model.cost("layercam")
    assert model == model_from_proto(info)  # value semantics
