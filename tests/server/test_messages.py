"""Domain records to wire messages: faithfulness scores, curves and method costs survive the
trip through protobuf bytes, and what was not computed stays unset."""

from __future__ import annotations

import numpy as np
import pytest

from camserve.server import messages
from camserve.server.engine.types import LayerSpec
from camserve.server.records import (
    ExplainOutcome,
    HeatmapResult,
    ImageExplanation,
    InputRecipe,
    MethodInfo,
    ModelMeta,
    ModelStatus,
    Prediction,
    StageTimes,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME

MAP = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)


def outcome(*heatmaps: HeatmapResult) -> ExplainOutcome:
    image = ImageExplanation(
        predictions=(Prediction(3, "class_3", 0.5, 2.0),), heatmaps=heatmaps, overlay_png=b""
    )
    return ExplainOutcome(
        model="tiny",
        model_version="1",
        images=(image,),
        times=StageTimes(0.001, 0.002, 0.003, 0.006),
        batch_size=1,
    )


def wire(*heatmaps: HeatmapResult) -> pb.ExplainResponse:
    """The response as the client parses it: serialised and read back."""
    sent = messages.explain_response("r", outcome(*heatmaps)).SerializeToString()
    return pb.ExplainResponse.FromString(sent)


def test_scores_and_curves_travel_in_their_fields() -> None:
    deletion = (0.5, 0.25, 0.125, 0.0625)
    insertion = (0.01, 0.2, 0.4, 0.5)
    scored = HeatmapResult(
        method="scorecam",
        class_index=3,
        class_label="class_3",
        layer="features",
        data=MAP,
        scores={"confidence_change": -0.25, "deletion_auc": 0.1875, "insertion_auc": 0.3},
        curves={"deletion_auc": deletion, "insertion_auc": insertion},
    )
    (heatmap,) = wire(scored).results[0].heatmaps
    assert heatmap.method == pb.METHOD_SCORECAM
    assert heatmap.confidence_change == -0.25
    assert heatmap.deletion_auc == 0.1875
    assert heatmap.insertion_auc == pytest.approx(0.3)
    assert list(heatmap.deletion_curve) == list(deletion)  # exact in float32
    assert list(heatmap.insertion_curve) == pytest.approx(insertion)


def test_only_the_computed_scores_are_set() -> None:
    plain = HeatmapResult("eigencam", 3, "class_3", "features", MAP)
    partial = HeatmapResult("gradcam", 3, "class_3", "features", MAP, scores={"deletion_auc": 0.0})
    first, second = wire(plain, partial).results[0].heatmaps
    for field in ("confidence_change", "deletion_auc", "insertion_auc"):
        assert not first.HasField(field)
    assert not first.deletion_curve
    assert second.HasField("deletion_auc")  # a score of exactly 0 is still sent
    assert second.deletion_auc == 0.0
    assert not second.HasField("confidence_change")
    assert not second.HasField("insertion_auc")
    assert not second.deletion_curve


def meta(costs: tuple[MethodInfo, ...]) -> ModelMeta:
    return ModelMeta(
        name="tiny",
        version="1",
        device="cpu",
        num_classes=10,
        labels=tuple(f"class_{i}" for i in range(10)),
        default_layer="features",
        layers=(LayerSpec("features", (16, 8, 8)),),
        recipe=InputRecipe(resize=0, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3),
        max_batch_size=8,
        methods=costs,
    )


def test_model_info_lists_every_method_with_its_cost() -> None:
    costs = tuple(
        MethodInfo(name, rows, passes, frozenset({"nchw"}))
        for name, rows, passes in (
            *((name, 1, 1.0) for name in list(METHOD_BY_NAME)[:8]),
            ("ablationcam", 17, 1.25),
            ("scorecam", 17, 17.0),
            *((name, 1, 2.0) for name in ("saliency", "input_x_gradient")),
            ("smoothgrad", 26, 51.0),
            ("integrated_gradients", 52, 103.0),
            *((name, 1, 2.0) for name in ("guided_backprop", "guided_gradcam")),
        )
    )
    status = ModelStatus(name="tiny", version="1", max_batch_size=8, meta=meta(costs))
    info = pb.ModelInfo.FromString(messages.model_info(status).SerializeToString())
    assert list(info.methods) == list(METHOD_BY_NAME.values())
    assert [(c.method, c.rows_per_image, c.forward_passes) for c in info.method_costs] == [
        (METHOD_BY_NAME[c.method], c.rows, c.forward_passes) for c in costs
    ]


def test_a_loading_model_has_no_methods_or_costs() -> None:
    info = messages.model_info(ModelStatus(name="tiny", version="1", max_batch_size=8, meta=None))
    assert not info.ready
    assert not info.methods
    assert not info.method_costs


def test_a_failing_model_is_described_in_full_but_not_ready() -> None:
    loaded = meta(tuple(MethodInfo(name, 1, 1.0, frozenset({"nchw"})) for name in METHOD_BY_NAME))
    serving = ModelStatus(name="tiny", version="1", max_batch_size=8, meta=loaded)
    failing = ModelStatus(name="tiny", version="1", max_batch_size=8, meta=loaded, serving=False)
    assert messages.model_info(serving).ready
    info = messages.model_info(failing)
    assert not info.ready
    assert list(info.methods) == list(METHOD_BY_NAME.values())  # still described in full
