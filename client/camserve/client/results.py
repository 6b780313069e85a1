"""Immutable result types, and their construction from v1 protobuf messages.

Callers get plain dataclasses and numpy arrays, never protobuf objects, so code using the client
does not change when the wire format grows.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image as PILImage

from camserve.client.kernels import ConvLayerInfo
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import NAME_BY_METHOD
from camserve.v1.scores import CURVE_FIELDS, SCORE_BY_NAME
from camserve.v1.tensors import from_proto

METHOD_NAMES = NAME_BY_METHOD
HeatmapKey = tuple[str, int]  # (method, class_index)


def _empty() -> Mapping[HeatmapKey, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Prediction:
    """One class score: `probability` is the softmax of `logit` over all classes."""

    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Timing:
    """Where the server spent a request's time, in milliseconds."""

    queue_ms: float
    preprocess_ms: float
    compute_ms: float
    total_ms: float


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One layer's activations for one image: `array` (k, h, w), channels-first whatever the
    layer's layout, holding the channels numbered `channels`; `means` and `maxes` give every
    channel's (C values) raw spatial mean and maximum."""

    layer: str
    array: np.ndarray
    channels: tuple[int, ...]
    means: np.ndarray
    maxes: np.ndarray


@dataclass(frozen=True, eq=False)
class GateValues:
    """One attention gate's output for one image: `values` (C,) for kind "channel", (H, W) in
    [0, 1] for kind "spatial" (at the resolution asked for, to lay over the image)."""

    name: str
    kind: str
    values: np.ndarray


def _no_features() -> Mapping[str, FeatureMap]:
    return MappingProxyType({})


def _no_gates() -> Mapping[str, GateValues]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False)
class Explanation:
    """The explanation of one image.

    `heatmaps` maps (method, class_index) to an HxW float array (read-only), in the order the
    server sent them; `class_labels` names every class that has a heatmap. Fields about the
    request (`timing`, `batch_size`, `model`, `request_id`) are shared by the images of one
    request.

    A pixel attribution's heatmap (saliency, ..., guided_gradcam) is HxW at the resolution asked
    for, or its 3xHxW attribution at the model input's resolution when the call asked for `raw`.

    `scores` maps the same (method, class_index) keys to that heatmap's faithfulness scores by
    name (confidence_change, deletion_auc, insertion_auc), for the heatmaps that have any (none
    unless the call asked for `scores`). `curves` maps them to the deletion and insertion curves
    by the same names: S + 1 class probabilities, from step 0 (nothing perturbed) to step S,
    when the call asked for `score_curves`.

    `feature_maps` maps layer names to their `FeatureMap` and `gates` gate names to their
    `GateValues`, for the layers and gates the call asked for. A call with `heatmaps=False`
    gets neither heatmaps nor predictions.
    """

    predictions: tuple[Prediction, ...]
    heatmaps: Mapping[HeatmapKey, np.ndarray]
    class_labels: Mapping[int, str]
    layer: str
    overlay: PILImage.Image | None
    timing: Timing
    batch_size: int
    model: str
    model_version: str
    request_id: str
    scores: Mapping[HeatmapKey, Mapping[str, float]] = field(default_factory=_empty)
    curves: Mapping[HeatmapKey, Mapping[str, tuple[float, ...]]] = field(default_factory=_empty)
    feature_maps: Mapping[str, FeatureMap] = field(default_factory=_no_features)
    gates: Mapping[str, GateValues] = field(default_factory=_no_gates)
    # Integrated Gradients' convergence delta per heatmap: the sum of its attributions minus the
    # change of the class score from the baseline to the image (near 0 when the steps suffice).
    convergence_delta: Mapping[HeatmapKey, float] = field(default_factory=_empty)

    def heatmap(self, method: str | None = None, class_index: int | None = None) -> np.ndarray:
        """The first heatmap matching `method` and `class_index` (either may be left out)."""
        for (name, index), array in self.heatmaps.items():
            if (method is None or name == method) and (class_index is None or index == class_index):
                return array
        raise KeyError(
            f"no heatmap for method={method!r}, class_index={class_index!r}; "
            f"available (method, class_index): {list(self.heatmaps)}"
        )

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        return self.predictions[0]


@dataclass(frozen=True)
class InputSpec:
    """How the server turns an image into the model's input."""

    height: int
    width: int
    resize: int
    center_crop: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class LayerInfo:
    """A layer that can be explained, with its output shape (C, H, W) for one image."""

    name: str
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class MethodCost:
    """What one method costs per image at the model's default layer (without aug_smooth, which
    multiplies both by six, and without scores): rows put through the model, and the same work
    in forward passes of the whole model (Grad-CAM: 1 row, 1.0)."""

    method: str
    rows_per_image: int
    forward_passes: float


@dataclass(frozen=True)
class GateInfo:
    """An attention gate the server found: `kind` "channel" (shape (C,)) or "spatial" (shape
    (H, W) at the model's input size), and the module's class."""

    name: str
    kind: str
    shape: tuple[int, ...]
    module: str


GATE_KIND_NAMES = {pb.GATE_KIND_CHANNEL: "channel", pb.GATE_KIND_SPATIAL: "spatial"}


@dataclass(frozen=True)
class ModelInfo:
    """A model the server hosts; `method_costs` has one entry per method in `methods`."""

    name: str
    version: str
    device: str
    ready: bool
    input: InputSpec
    num_classes: int
    labels: tuple[str, ...]
    default_layer: str
    layers: tuple[LayerInfo, ...]
    methods: tuple[str, ...]
    max_batch_size: int
    method_costs: tuple[MethodCost, ...] = ()
    conv_layers: tuple[ConvLayerInfo, ...] = ()  # every Conv2d, for `Client.kernels`
    gates: tuple[GateInfo, ...] = ()  # attention gates, in the order they run

    def cost(self, method: str) -> MethodCost:
        """The cost of `method`; KeyError naming the methods that have one."""
        for cost in self.method_costs:
            if cost.method == method:
                return cost
        raise KeyError(
            f"no cost for method {method!r}; known: {[c.method for c in self.method_costs]}"
        )


def timing_from_proto(timing: pb.Timing) -> Timing:
    return Timing(
        queue_ms=timing.queue_ms,
        preprocess_ms=timing.preprocess_ms,
        compute_ms=timing.compute_ms,
        total_ms=timing.total_ms,
    )


def explanations_from_response(response: pb.ExplainResponse) -> list[Explanation]:
    """One Explanation per image of `response`, in the request's image order."""
    timing = timing_from_proto(response.timing)
    return [_explanation(result, response=response, timing=timing) for result in response.results]


def _explanation(
    result: pb.ImageResult, *, response: pb.ExplainResponse, timing: Timing
) -> Explanation:
    heatmaps: dict[HeatmapKey, np.ndarray] = {}
    scores: dict[HeatmapKey, Mapping[str, float]] = {}
    curves: dict[HeatmapKey, Mapping[str, tuple[float, ...]]] = {}
    deltas: dict[HeatmapKey, float] = {}
    labels: dict[int, str] = {}
    layer = ""
    for i, heatmap in enumerate(result.heatmaps):
        key = (METHOD_NAMES.get(heatmap.method, str(heatmap.method)), heatmap.class_index)
        heatmaps[key] = from_proto(heatmap.data, field=f"results.heatmaps[{i}].data")
        if found := _scores(heatmap):
            scores[key] = found
        if found_curves := _curves(heatmap):
            curves[key] = found_curves
        if heatmap.HasField("convergence_delta"):
            deltas[key] = heatmap.convergence_delta
        labels[heatmap.class_index] = heatmap.class_label
        layer = layer or heatmap.layer
    overlay = None
    if result.overlay_png:
        overlay = PILImage.open(io.BytesIO(result.overlay_png))
        overlay.load()
    return Explanation(
        predictions=tuple(
            Prediction(index=p.index, label=p.label, probability=p.probability, logit=p.logit)
            for p in result.predictions
        ),
        heatmaps=MappingProxyType(heatmaps),
        class_labels=MappingProxyType(labels),
        layer=layer,
        overlay=overlay,
        timing=timing,
        batch_size=response.batch_size,
        model=response.model,
        model_version=response.model_version,
        request_id=response.request_id,
        scores=MappingProxyType(scores),
        curves=MappingProxyType(curves),
        feature_maps=_feature_maps(result),
        gates=_gates(result),
        convergence_delta=MappingProxyType(deltas),
    )


def _feature_maps(result: pb.ImageResult) -> Mapping[str, FeatureMap]:
    return MappingProxyType(
        {
            found.layer: FeatureMap(
                layer=found.layer,
                array=from_proto(found.data, field=f"results.feature_maps[{i}].data"),
                channels=tuple(found.channels),
                means=np.array(found.channel_means, dtype=np.float32),
                maxes=np.array(found.channel_maxes, dtype=np.float32),
            )
            for i, found in enumerate(result.feature_maps)
        }
    )


def _gates(result: pb.ImageResult) -> Mapping[str, GateValues]:
    return MappingProxyType(
        {
            gate.name: GateValues(
                gate.name,
                GATE_KIND_NAMES.get(gate.kind, "unknown"),
                from_proto(gate.data, field=f"results.gates[{i}].data"),
            )
            for i, gate in enumerate(result.gates)
        }
    )


def _scores(heatmap: pb.Heatmap) -> Mapping[str, float]:
    """The scores the server set; an unset field was not asked for (0.0 is a real score)."""
    return MappingProxyType(
        {name: getattr(heatmap, name) for name in SCORE_BY_NAME if heatmap.HasField(name)}
    )


def _curves(heatmap: pb.Heatmap) -> Mapping[str, tuple[float, ...]]:
    return MappingProxyType(
        {
            name: tuple(getattr(heatmap, wire))
            for name, wire in CURVE_FIELDS.items()
            if getattr(heatmap, wire)
        }
    )


def model_from_proto(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name,
        version=info.version,
        device=info.device,
        ready=info.ready,
        input=InputSpec(
            height=info.input.height,
            width=info.input.width,
            resize=info.input.resize,
            center_crop=info.input.center_crop,
            mean=tuple(info.input.mean),
            std=tuple(info.input.std),
        ),
        num_classes=info.num_classes,
        labels=tuple(info.labels),
        default_layer=info.default_layer,
        layers=tuple(
            LayerInfo(name=layer.name, output_shape=tuple(layer.output_shape))
            for layer in info.layers
        ),
        methods=tuple(METHOD_NAMES.get(m, str(m)) for m in info.methods),
        max_batch_size=info.max_batch_size,
        method_costs=tuple(
            MethodCost(
                method=METHOD_NAMES.get(cost.method, str(cost.method)),
                rows_per_image=cost.rows_per_image,
                forward_passes=cost.forward_passes,
            )
            for cost in info.method_costs
        ),
        conv_layers=tuple(
            ConvLayerInfo(conv.name, tuple(conv.weight_shape), conv.groups)
            for conv in info.conv_layers
        ),
        gates=tuple(
            GateInfo(
                gate.name, GATE_KIND_NAMES.get(gate.kind, "unknown"), tuple(gate.shape), gate.module
            )
            for gate in info.gates
        ),
    )
