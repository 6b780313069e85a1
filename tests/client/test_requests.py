"""Checking explain options and building requests, before anything is sent."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import numpy as np
import pytest

from camserve.client.requests import ExplainKwargs, ExplainOptions, build_request
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.scores import SCORE_BY_NAME

IMAGE = np.zeros((8, 8, 3), np.uint8)


def test_defaults_ask_for_gradcam_of_the_predicted_class_at_original_size() -> None:
    request = build_request([IMAGE], ExplainOptions())
    assert request.model == ""
    assert request.layer == ""
    assert list(request.methods) == [pb.METHOD_GRADCAM]
    assert request.output.resolution == pb.RESOLUTION_ORIGINAL
    assert request.output.dtype == pb.DTYPE_FLOAT32
    assert not request.output.raw
    assert not request.output.overlay
    assert request.top_predictions == 5
    assert request.request_id == ""
    assert request.images[0].target == pb.Target()
    assert not request.images[0].target.HasField("top_k")
    assert not request.eigen_smooth
    assert not request.aug_smooth
    assert not request.output.scores
    assert request.output.score_steps == 0  # the server's default
    assert not request.output.score_curves


def test_every_option_reaches_the_request() -> None:
    options = ExplainOptions(
        model="resnet18",
        target=[285, "tabby"],
        methods=["layercam", "gradcampp", "layercam"],
        layer="layer3",
        resolution=(20, 30),
        dtype="float16",
        raw=True,
        overlay=True,
        top_predictions=2,
        eigen_smooth=True,
        aug_smooth=True,
        scores=["insertion", "deletion_auc", "insertion_auc"],
        score_steps=8,
        score_curves=True,
    )
    request = build_request([IMAGE, IMAGE], options, request_id="abc")
    assert request.model == "resnet18"
    assert request.layer == "layer3"
    assert list(request.methods) == [pb.METHOD_LAYERCAM, pb.METHOD_GRADCAMPP]  # deduplicated
    assert request.output.resolution == pb.RESOLUTION_EXPLICIT
    assert (request.output.height, request.output.width) == (20, 30)
    assert request.output.dtype == pb.DTYPE_FLOAT16
    assert request.output.raw
    assert request.output.overlay
    assert request.top_predictions == 2
    assert request.request_id == "abc"
    assert request.eigen_smooth
    assert request.aug_smooth
    assert list(request.output.scores) == [pb.SCORE_INSERTION_AUC, pb.SCORE_DELETION_AUC]
    assert request.output.score_steps == 8
    assert request.output.score_curves
    for image in request.images:
        assert list(image.target.class_indices) == [285]
        assert list(image.target.class_labels) == ["tabby"]


@pytest.mark.parametrize(
    ("target", "indices", "labels"),
    [(3, [3], []), ("cat", [], ["cat"]), ((1, 2), [1, 2], []), (["a", 0], [0], ["a"])],
)
def test_targets_take_indices_labels_and_sequences(target, indices, labels) -> None:
    proto = ExplainOptions(target=target).target_proto()
    assert list(proto.class_indices) == indices
    assert list(proto.class_labels) == labels


def test_top_k_sets_only_top_k() -> None:
    proto = ExplainOptions(top_k=3).target_proto()
    assert proto.HasField("top_k")
    assert proto.top_k == 3
    assert not proto.class_indices


def test_every_method_name_reaches_the_wire() -> None:
    names = list(METHOD_BY_NAME)
    assert len(names) == 16
    request = build_request([IMAGE], ExplainOptions(methods=names))
    assert list(request.methods) == list(METHOD_BY_NAME.values())


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ("confidence", [pb.SCORE_CONFIDENCE_CHANGE]),
        ("confidence_change", [pb.SCORE_CONFIDENCE_CHANGE]),
        (["deletion", "insertion"], [pb.SCORE_DELETION_AUC, pb.SCORE_INSERTION_AUC]),
        (("insertion_auc", "insertion", "confidence"), [3, 1]),
    ],
)
def test_scores_take_full_names_and_short_aliases_once_each(scores, expected) -> None:
    options = ExplainOptions(scores=scores)
    assert list(options.output_proto().scores) == expected
    assert all(name in SCORE_BY_NAME for name in options.score_names())


@pytest.mark.parametrize(("name", "value"), [("input", 2), ("feature", 1), ("original", 3)])
def test_named_resolutions(name, value) -> None:
    assert ExplainOptions(resolution=name).output_proto().resolution == value


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"target": 1, "top_k": 2}, ValueError, "either `target` or `top_k`"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_predictions": 0}, ValueError, "top_predictions"),
        ({"methods": "gradcam++"}, ValueError, "unknown methods"),
        ({"methods": []}, ValueError, "methods is empty"),
        ({"resolution": "full"}, ValueError, "resolution='full'"),
        ({"resolution": (0, 5)}, ValueError, r"\(height, width\)"),
        ({"resolution": (1, 2, 3)}, ValueError, r"\(height, width\)"),
        ({"dtype": "float64"}, ValueError, "dtype='float64'"),
        ({"target": -1}, ValueError, "negative"),
        ({"target": []}, ValueError, "target is empty"),
        ({"target": [1.5]}, TypeError, "target entries"),
        ({"target": True}, TypeError, "target entries"),
        ({"methods": ["gradcam", "ablation"]}, ValueError, r"unknown methods \['ablation'\]"),
        ({"scores": "faithfulness"}, ValueError, r"unknown scores \['faithfulness'\]"),
        ({"scores": ["deletion", "roads"]}, ValueError, "'confidence', 'deletion', 'insertion'"),
        ({"scores": "deletion", "score_steps": 0}, ValueError, "score_steps must be a positive"),
        ({"scores": "deletion", "score_steps": True}, ValueError, "score_steps must be"),
        ({"score_steps": 10}, ValueError, "score_steps only applies to the deletion"),
        ({"scores": "confidence", "score_steps": 10}, ValueError, "score_steps only applies"),
        ({"score_curves": True}, ValueError, "score_curves needs a curve score"),
        ({"scores": "confidence", "score_curves": True}, ValueError, "score_curves needs"),
        ({"aug_smooth": True, "resolution": "feature"}, ValueError, "aug_smooth averages"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(options, error, match) -> None:
    with pytest.raises(error, match=match):
        ExplainOptions(**options)


def test_no_images_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        build_request([], ExplainOptions())


def test_the_keyword_types_match_the_options() -> None:
    fields = {f.name for f in dataclasses.fields(ExplainOptions)}
    assert set(typing.get_type_hints(ExplainKwargs)) == fields


@pytest.mark.parametrize("method", ["explain", "explain_batch", "explain_many"])
def test_sync_and_async_clients_take_the_same_explain_arguments(method: str) -> None:
    """Both clients declare the explain options once (ExplainKwargs): their signatures agree."""
    from camserve.client import AsyncClient, Client

    sync_signature = inspect.signature(getattr(Client, method))
    async_signature = inspect.signature(getattr(AsyncClient, method))
    assert sync_signature.parameters == async_signature.parameters
    options = sync_signature.parameters["options"]
    assert options.kind is inspect.Parameter.VAR_KEYWORD
    assert "Unpack[ExplainKwargs]" in str(options.annotation)


def test_pixel_attribution_options_reach_the_wire_and_unset_ones_stay_unset() -> None:
    options = ExplainOptions(
        methods=["smoothgrad", "integrated_gradients"],
        samples=8,
        noise=0.2,
        seed=0,
        steps=16,
        quadrature="riemann_trapezoid",
        baseline="black",
        reduction="sum_abs",
        normalisation="percentile_99",
    )
    sent = build_request([IMAGE], options).pixel_attribution
    assert (sent.samples, sent.steps, sent.seed) == (8, 16, 0)
    assert sent.HasField("seed")  # seed 0 is a seed, not "draw one"
    assert sent.noise == pytest.approx(0.2)
    assert (sent.quadrature, sent.baseline) == (pb.QUADRATURE_RIEMANN_TRAPEZOID, pb.BASELINE_BLACK)
    assert (sent.reduction, sent.normalisation) == (
        pb.REDUCTION_SUM_ABS,
        pb.NORMALISATION_PERCENTILE_99,
    )
    default = build_request([IMAGE], ExplainOptions(methods="saliency")).pixel_attribution
    assert default == pb.SaliencyOptions()  # the server's defaults, a random seed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"samples": 0}, r"samples must be an int >= 1; got 0"),
        ({"seed": -1}, r"seed must be an int >= 0; got -1"),
        ({"noise": 0.0}, r"noise must be a positive number"),
        ({"reduction": "mean"}, r"reduction='mean': use one of \['max_abs', 'sum_abs', 'sum'\]"),
        ({"quadrature": "simpson"}, r"quadrature='simpson': use one of"),
    ],
)
def test_bad_pixel_attribution_options_are_refused_naming_them(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ExplainOptions(methods="saliency", **changes)  # type: ignore[arg-type]
