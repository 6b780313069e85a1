"""Checking explain options and building requests, before anything is sent."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import numpy as np
import pytest

from camserve.client.requests import ExplainKwargs, ExplainOptions, build_request
from camserve.v1 import explain_pb2 as pb

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
