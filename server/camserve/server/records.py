"""Plain records shared by the servicer, the request checker and the explain pipeline.

Nothing here imports torch: the protocol side (servicer, validation, messages) reads these
records without loading the engine. Engine types appear only as annotations.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from camserve.server.engine.types import LayerSpec


@dataclass(frozen=True)
class InputRecipe:
    """How a model's inputs are made: shorter side resized, centre crop, normalisation."""

    resize: int  # 0: resize straight to crop x crop
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EncodedImage:
    """Image file bytes (JPEG, PNG or WebP) as sent, with the request field they came from."""

    data: bytes
    field: str


@dataclass(frozen=True)
class ArrayImage:
    """Pixels sent as a tensor: uint8 (H, W, 3) RGB, or a float32 (3, H, W) model input."""

    array: np.ndarray
    field: str
    normalised: bool  # True: float32, already resized and normalised by the caller


ImageSource = EncodedImage | ArrayImage


@dataclass(frozen=True)
class MethodInfo:
    """One method as a loaded model offers it, from the engine's method registry: what it costs
    per image at the model's default layer (GetModel) and which layers it can explain
    (request validation)."""

    method: str
    rows: int  # rows it puts through the model: the explain row plus forward-only rows
    forward_passes: float  # the same work in forward passes of the whole model
    layouts: frozenset[str]  # the layer layouts it accepts (`LayerSpec.layout`)
    channel_rows: bool = False  # whether it adds a row per channel of the layer after the pass
    through_tail: bool = False  # whether those rows run only the modules after the layer
    pixel: bool = False  # a pixel attribution: maps at the input's resolution, 3xHxW when raw
    input_gradient: bool = False  # whether its explain row takes the gradient at the input
    gradient_rows: str = ""  # "noise" (SmoothGrad) or "path" (IG): gradient rows after the pass


@dataclass(frozen=True)
class ConvLayer:
    """A Conv2d of a model: its weight's shape (out, in / groups, kh, kw) and groups."""

    name: str
    weight_shape: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class GateSpec:
    """An attention gate: a module whose output scales channels (kind "channel", shape (C,))
    or positions (kind "spatial", shape (H, W) at the model's input size), and its class."""

    name: str
    kind: str
    shape: tuple[int, ...]
    module: str


@dataclass(frozen=True)
class ModelMeta:
    """What clients and the request checker need to know about a loaded model."""

    name: str
    version: str
    device: str
    num_classes: int
    labels: tuple[str, ...]
    default_layer: str
    layers: tuple[LayerSpec, ...]
    recipe: InputRecipe
    max_batch_size: int
    methods: tuple[MethodInfo, ...] = ()  # every method of the registry, in wire order
    conv_layers: tuple[ConvLayer, ...] = ()  # every Conv2d, in module order (kernels)
    gates: tuple[GateSpec, ...] = ()  # attention gates, in the order they run
    # Methods of the registry this model is not offered, with the reason (the guided methods on
    # a model whose nonlinearities they do not control).
    refused: Mapping[str, str] = field(default_factory=dict)
    # The engine runs the model on the CPU in channels_last: prepared float inputs are then
    # laid out (H, W, 3) in memory, like decoded pixels, so its stager needs no transposing copy.
    channels_last_input: bool = False

    @functools.cached_property
    def layer_names(self) -> frozenset[str]:
        return frozenset(layer.name for layer in self.layers)

    @functools.cached_property
    def layer_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Layer name to its (C, h, w) output for one image, built once per model."""
        return {layer.name: layer.shape for layer in self.layers}

    @functools.cached_property
    def method_info(self) -> dict[str, MethodInfo]:
        """Method name to what the model offers of it."""
        return {info.method: info for info in self.methods}

    def layers_for(self, method: str) -> list[str]:
        """The target layers `method` can explain, in forward order."""
        layouts = self.method_info[method].layouts
        return [layer.name for layer in self.layers if layer.layout in layouts]

    @functools.cached_property
    def label_index(self) -> dict[str, int]:
        """Label to class index, built once per model rather than per request."""
        return {label: i for i, label in enumerate(self.labels)}


@dataclass(frozen=True)
class ModelStatus:
    """A hosted model as listed by ListModels: its configuration, and its meta once loaded."""

    name: str
    version: str
    max_batch_size: int
    meta: ModelMeta | None  # None while the model is loading
    serving: bool = True  # False while the model is failing (its batches keep faulting)


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class HeatmapResult:
    """One shaped heatmap: (H, W) float32, float16 or uint8, as the request asked, with the
    faithfulness scores the request asked for (name -> value) and, when asked, their curves
    (name -> class probability at each step, S + 1 values)."""

    method: str
    class_index: int
    class_label: str
    layer: str
    data: np.ndarray
    scores: Mapping[str, float] = field(default_factory=dict)
    curves: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    convergence_delta: float | None = None  # Integrated Gradients only


@dataclass(frozen=True)
class FeatureMapResult:
    """One layer's selected channels (k, h, w) in the wire dtype, their indices, and every
    channel's raw spatial mean and maximum."""

    layer: str
    data: np.ndarray
    channels: tuple[int, ...]
    means: tuple[float, ...]
    maxes: tuple[float, ...]


@dataclass(frozen=True)
class GateResult:
    """One gate's values for one image: (C,) for kind "channel", (H, W) for "spatial"."""

    name: str
    kind: str
    data: np.ndarray


@dataclass(frozen=True)
class ImageExplanation:
    """One image's predictions (most probable first), heatmaps and optional overlay PNG, and
    the feature maps and gate values it asked for."""

    predictions: tuple[Prediction, ...]
    heatmaps: tuple[HeatmapResult, ...]
    overlay_png: bytes
    feature_maps: tuple[FeatureMapResult, ...] = ()
    gates: tuple[GateResult, ...] = ()


@dataclass(frozen=True)
class StageTimes:
    """Seconds one request spent in each stage; queue and compute are its slowest image's."""

    queue_s: float
    preprocess_s: float
    compute_s: float
    total_s: float


@dataclass(frozen=True)
class ExplainOutcome:
    """A whole request's answer, in the order of its images."""

    model: str
    model_version: str
    images: tuple[ImageExplanation, ...]
    times: StageTimes
    batch_size: int  # the largest batch any of its images ran in
