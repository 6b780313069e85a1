"""Turns engine results into response messages: predictions, shaped heatmaps, overlays.

Runs on CPU worker threads after the batch, so upsampling to large originals and PNG encoding
never hold up the engine.
"""

from __future__ import annotations

import io
from typing import cast

import numpy as np
import torch

from camserve.server.engine import RowResult
from camserve.server.engine.shaping import shape_heatmaps
from camserve.server.preprocess import PreparedImage
from camserve.server.runtime import ModelMeta
from camserve.server.validation import METHOD_ENUMS, ExplainPlan, OutputPlan
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import dtype_name, to_proto

_RESOLUTION_NAMES: dict[int, str] = {
    pb.RESOLUTION_FEATURE_MAP: "feature",
    pb.RESOLUTION_INPUT: "input",
    pb.RESOLUTION_ORIGINAL: "original",
    pb.RESOLUTION_EXPLICIT: "explicit",
}


def _shape(maps: torch.Tensor, prepared: PreparedImage, output: OutputPlan) -> np.ndarray:
    """(K, h, w) raw maps at the resolution and dtype the caller asked for, normalised unless
    raw (see `shape_heatmaps` for the rule)."""
    return shape_heatmaps(
        maps,
        prepared.geometry,
        _RESOLUTION_NAMES[output.resolution],
        output.size,
        normalised=not output.raw,
        dtype=dtype_name(output.dtype),
    )


def _encode(maps: np.ndarray, dtype: int) -> list[pb.Tensor]:
    return [to_proto(m, dtype) for m in maps]


def _overlay_png(prepared: PreparedImage, first_map: torch.Tensor) -> bytes:
    from camserve.client.render import overlay

    assert prepared.original is not None
    heatmap = shape_heatmaps(first_map[None], prepared.geometry, "original", dtype="uint8")[0]
    buffer = io.BytesIO()
    overlay(prepared.original, heatmap).save(buffer, format="PNG")
    return buffer.getvalue()


def image_result(
    result: RowResult, prepared: PreparedImage, plan: ExplainPlan, meta: ModelMeta
) -> pb.ImageResult:
    """One image's predictions and heatmaps, ordered by class (as explained), then method."""
    probabilities, indices = torch.topk(result.probabilities, plan.top_predictions)
    predictions = [
        pb.Prediction(
            index=int(i),
            label=meta.labels[int(i)],
            probability=float(p),
            logit=float(result.logits[int(i)]),
        )
        for p, i in zip(probabilities, indices, strict=True)
    ]
    keys = [(method, cls) for cls in result.classes for method in plan.methods]
    raw = torch.stack([result.maps[key] for key in keys]).float()
    shaped = _shape(raw, prepared, plan.output)
    heatmaps = [
        pb.Heatmap(
            method=cast("pb.Method", METHOD_ENUMS[method]),
            class_index=cls,
            class_label=meta.labels[cls],
            layer=result.layer,
            data=data,
        )
        for (method, cls), data in zip(keys, _encode(shaped, plan.output.dtype), strict=True)
    ]
    overlay_png = _overlay_png(prepared, raw[0]) if plan.output.overlay else b""
    return pb.ImageResult(predictions=predictions, heatmaps=heatmaps, overlay_png=overlay_png)
