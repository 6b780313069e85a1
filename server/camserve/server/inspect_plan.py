"""Checks the feature-map and gate options of an ExplainRequest (fields 10-12) against a model.

Torch-free, like the rest of validation: it reads `ModelMeta` (layers with their shapes, gates)
and the limits. Every refusal names the field, what was wrong and how to fix it. Also counts
what the options add to an answer on the wire (`wire_bytes`), for the response-size check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from camserve.server.errors import InvalidRequest
from camserve.server.records import ModelMeta
from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb

if TYPE_CHECKING:
    from camserve.server.engine.shaping import Geometry

DEFAULT_CHANNELS = 16
SELECTION_NAMES: dict[int, str] = {
    pb.CHANNEL_SELECTION_UNSPECIFIED: "first",
    pb.CHANNEL_SELECTION_FIRST: "first",
    pb.CHANNEL_SELECTION_TOP_MEAN: "top_mean",
    pb.CHANNEL_SELECTION_TOP_GRADCAM: "top_gradcam",
    pb.CHANNEL_SELECTION_INDICES: "indices",
}
_RESOLUTIONS = (pb.RESOLUTION_FEATURE_MAP, pb.RESOLUTION_INPUT, pb.RESOLUTION_ORIGINAL)
_ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_UINT8: 1}
_PER_MESSAGE = 64  # a FeatureMap's or GateValues' name, tags and tensor header, generous


class InspectError(InvalidRequest):
    """A feature-map or gate option the server refuses; the message starts with its field."""


@dataclass(frozen=True)
class LayerPick:
    """One layer's channels to return: `count` of them by `selection`, or `indices`."""

    layer: str
    count: int
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class FeaturePlan:
    picks: tuple[LayerPick, ...]
    selection: str  # first, top_mean, top_gradcam or indices
    resolution: int  # a pb.Resolution: FEATURE_MAP, INPUT or ORIGINAL
    dtype: int  # a pb.DType, never UNSPECIFIED
    raw: bool


@dataclass(frozen=True)
class GatePlan:
    names: tuple[str, ...]
    resolution: int  # for spatial gates: FEATURE_MAP, INPUT or ORIGINAL


@dataclass(frozen=True)
class InspectPlan:
    """What a request asks to see inside the model; `heatmaps` False: nothing else."""

    features: FeaturePlan | None = None
    gates: GatePlan | None = None
    heatmaps: bool = True

    @property
    def asked(self) -> bool:
        return self.features is not None or self.gates is not None


def _resolution(value: int, field: str) -> int:
    if value == pb.RESOLUTION_UNSPECIFIED:
        return pb.RESOLUTION_FEATURE_MAP
    if value not in _RESOLUTIONS:
        raise InspectError(
            f"{field}: {pb.Resolution.Name(value) if value in pb.Resolution.values() else value} "
            "is not offered here; use RESOLUTION_FEATURE_MAP (the default), RESOLUTION_INPUT or "
            "RESOLUTION_ORIGINAL"
        )
    return value


def _layers(options: pb.FeatureMapOptions, meta: ModelMeta, limits: LimitsSettings) -> list[str]:
    layers = list(options.layers)
    if not layers:
        raise InspectError(
            "feature_maps.layers: name at least one layer (any of ModelInfo.layers, e.g. "
            f"{meta.default_layer!r})"
        )
    if len(layers) > limits.max_feature_layers:
        raise InspectError(
            f"feature_maps.layers: {len(layers)} layers is over the limit of "
            f"{limits.max_feature_layers} per request; ask for fewer, or split the request"
        )
    for j, layer in enumerate(layers):
        if layer not in meta.layer_names:
            shown = ", ".join(spec.name for spec in meta.layers[:12])
            raise InspectError(
                f"feature_maps.layers[{j}]: {layer!r} is not a layer of model {meta.name!r}; "
                f"layers are listed by GetModel ({len(meta.layers)} in all, first ones: {shown})"
            )
        if layers.index(layer) != j:
            raise InspectError(f"feature_maps.layers[{j}]: {layer!r} is listed twice; list it once")
    return layers


def _indices(
    options: pb.FeatureMapOptions, layers: Sequence[str], meta: ModelMeta, limit: int
) -> tuple[int, ...]:
    indices = tuple(int(i) for i in options.channel_indices)
    if not indices:
        raise InspectError(
            "feature_maps.channel_indices: CHANNEL_SELECTION_INDICES needs the channel indices"
        )
    if options.channels:
        raise InspectError(
            "feature_maps.channels: not used with CHANNEL_SELECTION_INDICES; leave it 0"
        )
    if len(indices) > limit:
        raise InspectError(
            f"feature_maps.channel_indices: {len(indices)} channels is over the limit of {limit} "
            "per layer (limits.max_feature_channels); ask for fewer"
        )
    if len(set(indices)) != len(indices):
        raise InspectError("feature_maps.channel_indices: an index is listed twice; list each once")
    for layer in layers:
        channels = meta.layer_shapes[layer][0]
        for j, index in enumerate(indices):
            if index >= channels:
                raise InspectError(
                    f"feature_maps.channel_indices[{j}]: {index} is out of range for layer "
                    f"{layer!r}, which has {channels} channels (0..{channels - 1})"
                )
    return indices


def _picks(
    options: pb.FeatureMapOptions, layers: Sequence[str], meta: ModelMeta, limit: int
) -> tuple[LayerPick, ...]:
    """Each layer's channels: k = `channels` (0: up to 16) for the ranked selections."""
    if options.channel_indices:
        raise InspectError(
            "feature_maps.channel_indices: only used with CHANNEL_SELECTION_INDICES; set "
            "feature_maps.selection to it, or leave the indices out"
        )
    asked = int(options.channels)
    if asked > limit:
        raise InspectError(
            f"feature_maps.channels: {asked} is over the limit of {limit} channels per layer "
            "(limits.max_feature_channels); ask for fewer"
        )
    picks = []
    for layer in layers:
        channels = meta.layer_shapes[layer][0]
        if asked > channels:
            raise InspectError(
                f"feature_maps.channels: {asked} is more than layer {layer!r} has ({channels}); "
                f"ask for at most {channels}, or 0 for up to {DEFAULT_CHANNELS}"
            )
        picks.append(LayerPick(layer, asked or min(DEFAULT_CHANNELS, channels, limit)))
    return tuple(picks)


def _features(
    options: pb.FeatureMapOptions, meta: ModelMeta, limits: LimitsSettings
) -> FeaturePlan:
    if options.selection not in SELECTION_NAMES:
        raise InspectError(
            f"feature_maps.selection: unknown value {options.selection}; use one of "
            + ", ".join(f"{pb.ChannelSelection.Name(v)}={v}" for v in SELECTION_NAMES)
        )
    layers = _layers(options, meta, limits)
    selection = SELECTION_NAMES[options.selection]
    limit = limits.max_feature_channels
    if selection == "indices":
        indices = _indices(options, layers, meta, limit)
        picks = tuple(LayerPick(layer, len(indices), indices) for layer in layers)
    else:
        picks = _picks(options, layers, meta, limit)
    if options.dtype not in _ITEMSIZE and options.dtype != pb.DTYPE_UNSPECIFIED:
        raise InspectError(
            f"feature_maps.dtype: unknown value {options.dtype}; use DTYPE_FLOAT32, "
            "DTYPE_FLOAT16 or DTYPE_UINT8"
        )
    dtype = options.dtype or pb.DTYPE_FLOAT32
    if options.raw and dtype == pb.DTYPE_UINT8:
        raise InspectError(
            "feature_maps.dtype: DTYPE_UINT8 holds normalised channels; unset feature_maps.raw "
            "or use DTYPE_FLOAT32/DTYPE_FLOAT16"
        )
    resolution = _resolution(options.resolution, "feature_maps.resolution")
    return FeaturePlan(picks, selection, resolution, dtype, options.raw)


def _gates(options: pb.GateOptions, meta: ModelMeta) -> GatePlan:
    if not meta.gates:
        raise InspectError(
            f"gates: model {meta.name!r} has no attention gates (no squeeze-and-excitation, "
            "CBAM or other gate module was found at load; GetModel lists none), so there are no "
            "gate values to return; leave `gates` unset"
        )
    known = [gate.name for gate in meta.gates]
    for j, name in enumerate(options.names):
        if name not in known:
            raise InspectError(
                f"gates.names[{j}]: {name!r} is not a gate of model {meta.name!r}; its gates "
                f"are {', '.join(known[:8])}"
                + (f" ({len(known)} in all)" if len(known) > 8 else "")
            )
    names = tuple(dict.fromkeys(options.names)) or tuple(known)
    return GatePlan(names, _resolution(options.resolution, "gates.resolution"))


def _check_alone(request: pb.ExplainRequest) -> None:
    """With no_heatmaps, refuses the options that only concern heatmaps."""
    output = request.output
    if request.methods:
        raise InspectError("methods: no_heatmaps returns no heatmaps; leave methods empty")
    if output.scores or output.overlay:
        raise InspectError(
            "output: scores and overlays are made from heatmaps; with no_heatmaps leave "
            "output.scores and output.overlay unset"
        )
    if request.aug_smooth or request.eigen_smooth:
        raise InspectError(
            "aug_smooth/eigen_smooth: they smooth heatmaps; unset them with no_heatmaps"
        )


def inspect_plan(
    request: pb.ExplainRequest, meta: ModelMeta, limits: LimitsSettings
) -> InspectPlan:
    """The request's feature-map and gate options, checked; InspectError names the bad field."""
    features = None
    if request.HasField("feature_maps"):
        features = _features(request.feature_maps, meta, limits)
    gates = _gates(request.gates, meta) if request.HasField("gates") else None
    if not request.no_heatmaps:
        return InspectPlan(features, gates)
    if features is None and gates is None:
        raise InspectError(
            "no_heatmaps: the request would return nothing; ask for feature_maps or gates, or "
            "unset no_heatmaps"
        )
    _check_alone(request)
    return InspectPlan(features, gates, heatmaps=False)


def _pixels(resolution: int, native: tuple[int, int], geometry: Geometry, crop: int) -> int:
    if resolution == pb.RESOLUTION_INPUT:
        return crop * crop
    if resolution == pb.RESOLUTION_ORIGINAL:
        return geometry.original_hw[0] * geometry.original_hw[1]
    return native[0] * native[1]


def wire_bytes(plan: InspectPlan, geometry: Geometry, meta: ModelMeta) -> int:
    """What one image's feature maps and gate values take in an answer, framing included."""
    total = 0
    crop = meta.recipe.crop
    if plan.features is not None:
        itemsize = _ITEMSIZE[plan.features.dtype]
        for pick in plan.features.picks:
            channels, height, width = meta.layer_shapes[pick.layer]
            pixels = _pixels(plan.features.resolution, (height, width), geometry, crop)
            total += pick.count * pixels * itemsize + 8 * channels + 4 * pick.count + _PER_MESSAGE
    if plan.gates is not None:
        shapes = {gate.name: gate.shape for gate in meta.gates}
        for name in plan.gates.names:
            shape = shapes[name]
            size = shape[0]
            if len(shape) == 2:
                size = _pixels(plan.gates.resolution, (shape[0], shape[1]), geometry, crop)
            total += 4 * size + _PER_MESSAGE
    return total
