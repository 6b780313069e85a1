"""The torch side of feature maps and gate values: what a row asks the engine for, and one
image's results shaped like heatmaps (`shaping`: resolution, dtype, per-channel min-max).

Runs on CPU worker threads after the batch, as heatmap shaping does.
"""

from __future__ import annotations

import numpy as np

from camserve.server.engine.shaping import Geometry, output_bytes, shape_heatmaps
from camserve.server.engine.types import (
    FeatureAsk,
    Inspection,
    RowResult,
    feature_keys,
    gate_key,
)
from camserve.server.inspect_plan import InspectPlan
from camserve.server.records import FeatureMapResult, GateResult, ModelMeta
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import dtype_name

RESOLUTIONS: dict[int, str] = {
    pb.RESOLUTION_FEATURE_MAP: "feature",
    pb.RESOLUTION_INPUT: "input",
    pb.RESOLUTION_ORIGINAL: "original",
}


def row_inspection(plan: InspectPlan) -> Inspection | None:
    """The engine's `Inspection` for each image of a request with this plan."""
    if not plan.asked:
        return None
    features: tuple[FeatureAsk, ...] = ()
    if plan.features is not None:
        selection = plan.features.selection
        features = tuple(
            FeatureAsk(pick.layer, selection, pick.count, pick.indices)
            for pick in plan.features.picks
        )
    gates = plan.gates.names if plan.gates is not None else ()
    return Inspection(features=features, gates=gates)


def _features(result: RowResult, geometry: Geometry, plan: InspectPlan) -> list[FeatureMapResult]:
    features = plan.features
    if features is None:
        return []
    shaped = []
    for pick in features.picks:
        keys = feature_keys(pick.layer)
        data = shape_heatmaps(
            result.outputs[keys.maps],
            geometry,
            RESOLUTIONS[features.resolution],
            normalised=not features.raw,
            dtype=dtype_name(features.dtype),
        )
        shaped.append(
            FeatureMapResult(
                layer=pick.layer,
                data=data,
                channels=tuple(result.outputs[keys.channels].tolist()),
                means=tuple(result.outputs[keys.means].tolist()),
                maxes=tuple(result.outputs[keys.maxes].tolist()),
            )
        )
    return shaped


def _gates(
    result: RowResult, geometry: Geometry, plan: InspectPlan, meta: ModelMeta
) -> list[GateResult]:
    gates = plan.gates
    if gates is None:
        return []
    shaped = []
    for gate in meta.gates:
        if gate.name not in gates.names:
            continue
        values = result.outputs[gate_key(gate.name)]
        if gate.kind == "spatial":
            resolution = RESOLUTIONS[gates.resolution]
            data = shape_heatmaps(values[None], geometry, resolution, normalised=False)[0]
        else:
            data = np.ascontiguousarray(values.numpy(), dtype=np.float32)
        shaped.append(GateResult(gate.name, gate.kind, data))
    return shaped


def shape_inspection(
    result: RowResult, geometry: Geometry, plan: InspectPlan, meta: ModelMeta
) -> tuple[tuple[FeatureMapResult, ...], tuple[GateResult, ...]]:
    """One image's feature maps and gate values, at the resolutions and dtype asked for."""
    return tuple(_features(result, geometry, plan)), tuple(_gates(result, geometry, plan, meta))


def shaping_bytes(plan: InspectPlan, geometry: Geometry, meta: ModelMeta) -> int:
    """An upper bound on what shaping one image's feature maps and spatial gates allocates."""
    total = 0
    if plan.features is not None:
        resolution = RESOLUTIONS[plan.features.resolution]
        dtype = dtype_name(plan.features.dtype)
        for pick in plan.features.picks:
            _, height, width = meta.layer_shapes[pick.layer]
            total += output_bytes(geometry, resolution, None, dtype, pick.count, (height, width))
    if plan.gates is not None:
        resolution = RESOLUTIONS[plan.gates.resolution]
        for gate in meta.gates:
            if gate.kind == "spatial" and gate.name in plan.gates.names:
                shape = (gate.shape[0], gate.shape[1])
                total += output_bytes(geometry, resolution, None, "float32", 1, shape)
    return total
