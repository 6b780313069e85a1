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
from camserve.server.engine.shaping import normalise, to_input, to_original, to_size
from camserve.server.preprocess import PreparedImage
from camserve.server.runtime import ModelMeta
from camserve.server.validation import METHOD_ENUMS, ExplainPlan, OutputPlan
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import to_proto


def _shape(maps: torch.Tensor, prepared: PreparedImage, output: OutputPlan) -> torch.Tensor:
    """(K, h, w) raw maps at the resolution the caller asked for, normalised unless raw."""
    geometry = prepared.geometry
    if output.resolution == pb.RESOLUTION_FEATURE_MAP:
        shaped = maps
    elif output.resolution == pb.RESOLUTION_INPUT:
        shaped = to_input(maps, (geometry.crop_box[2], geometry.crop_box[3]))
    elif output.resolution == pb.RESOLUTION_EXPLICIT:
        assert output.size is not None
        shaped = to_size(maps, output.size, geometry)
    else:
        shaped = to_original(maps, geometry)
    return shaped if output.raw else normalise(shaped)


def _encode(maps: np.ndarray, dtype: int) -> list[pb.Tensor]:
    if dtype == pb.DTYPE_UINT8:
        maps = np.clip(np.rint(maps * 255.0), 0, 255).astype(np.uint8)
    return [to_proto(m, dtype) for m in maps]


def _overlay_png(prepared: PreparedImage, first_map: torch.Tensor) -> bytes:
    from camserve.client.render import overlay

    assert prepared.original is not None
    heatmap = normalise(to_original(first_map[None], prepared.geometry))[0].numpy()
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
    shaped = _shape(raw, prepared, plan.output).contiguous().numpy()
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
