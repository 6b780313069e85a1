"""The feature-map and gate options of an ExplainRequest, checked before anything is queued
(`camserve.server.inspect_plan`), and what they add to an answer's size."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from camserve.server.engine.shaping import Geometry
from camserve.server.engine.types import LayerSpec
from camserve.server.errors import InvalidRequest
from camserve.server.inspect_plan import InspectPlan, LayerPick, wire_bytes
from camserve.server.records import GateSpec
from camserve.server.settings import LimitsSettings
from camserve.server.validation import check_response_size, validate
from camserve.v1 import explain_pb2 as pb
from tests.server.test_validation import meta

LIMITS = LimitsSettings(max_feature_layers=2, max_feature_channels=8)
LAYERS = (LayerSpec("conv", (4, 16, 16)), LayerSpec("features", (16, 8, 8)))
GATES = (GateSpec("se", "channel", (16,), "Sigmoid"), GateSpec("sa", "spatial", (8, 8), "Gate"))
GATED = dataclasses.replace(meta(layers=LAYERS), gates=GATES)


def asking(**fields: Any) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[pb.Image(encoded=b"x")], **fields)


def features(**options: Any) -> pb.ExplainRequest:
    return asking(feature_maps=pb.FeatureMapOptions(**options))


def refusal(message: pb.ExplainRequest, model: Any = GATED) -> str:
    with pytest.raises(InvalidRequest) as refused:
        validate(message, model, LIMITS)
    return str(refused.value)


def test_channels_default_to_16_or_the_layers_own_count() -> None:
    plan = validate(features(layers=["conv", "features"]), GATED, LimitsSettings()).inspect
    assert plan.features is not None
    assert plan.features.picks == (LayerPick("conv", 4), LayerPick("features", 16))
    assert plan.features.resolution == pb.RESOLUTION_FEATURE_MAP
    assert plan.heatmaps


def test_explicit_indices_and_selections() -> None:
    message = features(
        layers=["features"],
        selection=pb.CHANNEL_SELECTION_INDICES,
        channel_indices=[5, 0],
        dtype=pb.DTYPE_FLOAT16,
    )
    plan = validate(message, GATED, LIMITS).inspect.features
    assert plan is not None
    assert plan.picks == (LayerPick("features", 2, (5, 0)),)
    assert plan.selection == "indices"
    ranked = features(layers=["conv"], selection=pb.CHANNEL_SELECTION_TOP_GRADCAM, channels=3)
    assert validate(ranked, GATED, LIMITS).inspect.features.selection == "top_gradcam"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (features(), "feature_maps.layers: name at least one layer"),
        (features(layers=["conv", "conv"]), "feature_maps.layers[1]: 'conv' is listed twice"),
        (features(layers=["conv", "features", "x"]), "3 layers is over the limit of 2"),
        (features(layers=["fc"]), "feature_maps.layers[0]: 'fc' is not a layer of model 'tiny'"),
        (features(layers=["conv"], channels=9), "feature_maps.channels: 9 is over the limit of 8"),
        (features(layers=["conv"], channels=5), "5 is more than layer 'conv' has (4)"),
        (
            features(layers=["conv"], channel_indices=[1]),
            "only used with CHANNEL_SELECTION_INDICES",
        ),
        (
            features(layers=["conv"], selection=pb.CHANNEL_SELECTION_INDICES),
            "CHANNEL_SELECTION_INDICES needs the channel indices",
        ),
        (
            features(
                layers=["features", "conv"],
                selection=pb.CHANNEL_SELECTION_INDICES,
                channel_indices=[1, 7],
            ),
            "channel_indices[1]: 7 is out of range for layer 'conv', which has 4 channels (0..3)",
        ),
        (
            features(
                layers=["conv"], selection=pb.CHANNEL_SELECTION_INDICES, channel_indices=[1, 1]
            ),
            "an index is listed twice",
        ),
        (features(layers=["conv"], selection=9), "feature_maps.selection: unknown value 9"),
        (
            features(layers=["conv"], resolution=pb.RESOLUTION_EXPLICIT),
            "feature_maps.resolution: RESOLUTION_EXPLICIT is not offered here",
        ),
        (
            features(layers=["conv"], dtype=pb.DTYPE_UINT8, raw=True),
            "DTYPE_UINT8 holds normalised channels",
        ),
        (asking(gates=pb.GateOptions(names=["fc"])), "gates.names[0]: 'fc' is not a gate"),
        (asking(no_heatmaps=True), "no_heatmaps: the request would return nothing"),
        (
            asking(no_heatmaps=True, gates=pb.GateOptions(), methods=[pb.METHOD_GRADCAM]),
            "methods: no_heatmaps returns no heatmaps",
        ),
        (
            asking(no_heatmaps=True, gates=pb.GateOptions(), output=pb.OutputOptions(overlay=True)),
            "scores and overlays are made from heatmaps",
        ),
    ],
)
def test_refusals_name_the_field_and_the_fix(message: pb.ExplainRequest, expected: str) -> None:
    assert expected in refusal(message)


def test_a_model_without_gates_refuses_to_return_none() -> None:
    message = asking(gates=pb.GateOptions())
    assert "model 'tiny' has no attention gates" in refusal(message, meta(layers=LAYERS))
    plan = validate(message, GATED, LIMITS).inspect.gates
    assert plan is not None
    assert plan.names == ("se", "sa")  # every gate, in the order they run


def test_no_heatmaps_plans_no_maps_and_no_methods() -> None:
    plan = validate(asking(no_heatmaps=True, gates=pb.GateOptions()), GATED, LIMITS)
    assert plan.methods == ()
    assert plan.budget.maps_per_image == (0,)
    assert not plan.inspect.heatmaps


def test_the_outputs_count_towards_the_response_size() -> None:
    geometry = Geometry((600, 800), (600, 800), (0, 0, 32, 32))
    message = features(layers=["conv"], channels=4, resolution=pb.RESOLUTION_ORIGINAL)
    plan = validate(message, GATED, LIMITS)
    assert wire_bytes(plan.inspect, geometry, GATED) >= 4 * 600 * 800 * 4
    assert wire_bytes(InspectPlan(), geometry, GATED) == 0
    with pytest.raises(InvalidRequest, match="fewer feature-map layers or channels"):
        check_response_size(plan, [geometry], GATED, 4 * 2**20)
    check_response_size(plan, [geometry], GATED, 16 * 2**20)
