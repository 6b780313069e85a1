"""Turns one image's engine result into its answer: predictions, shaped heatmaps, an overlay.

Runs on CPU worker threads after the batch, so upsampling to large originals and PNG encoding
never hold up the engine.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from camserve.server.engine import RowResult
from camserve.server.engine.shaping import normalise, to_input, to_original, to_size
from camserve.server.preprocess import PreparedImage
from camserve.server.records import HeatmapResult, ImageExplanation, ModelMeta, Prediction
from camserve.server.validation import ExplainPlan, OutputPlan
from camserve.v1 import explain_pb2 as pb
from camserve.v1.render import blend


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


def _encode(maps: np.ndarray, dtype: int) -> np.ndarray:
    """The (K, H, W) float32 maps in the wire dtype the request asked for."""
    if dtype == pb.DTYPE_UINT8:
        return np.clip(np.rint(maps * 255.0), 0, 255).astype(np.uint8)
    if dtype == pb.DTYPE_FLOAT16:
        return maps.astype(np.float16)
    return maps


def _overlay_png(prepared: PreparedImage, first_map: torch.Tensor) -> bytes:
    assert prepared.original is not None
    heatmap = normalise(to_original(first_map[None], prepared.geometry))[0].numpy()
    buffer = io.BytesIO()
    blend(prepared.original, heatmap).save(buffer, format="PNG")
    return buffer.getvalue()


def _predictions(result: RowResult, count: int, meta: ModelMeta) -> tuple[Prediction, ...]:
    probabilities, indices = torch.topk(result.probabilities, count)
    return tuple(
        Prediction(
            index=int(i),
            label=meta.labels[int(i)],
            probability=float(p),
            logit=float(result.logits[int(i)]),
        )
        for p, i in zip(probabilities, indices, strict=True)
    )


def explain_image(
    result: RowResult, prepared: PreparedImage, plan: ExplainPlan, meta: ModelMeta
) -> ImageExplanation:
    """One image's predictions and heatmaps, ordered by class (as explained), then method."""
    keys = [(method, cls) for cls in result.classes for method in plan.methods]
    raw = torch.stack([result.maps[key] for key in keys]).float()
    shaped = _encode(_shape(raw, prepared, plan.output).contiguous().numpy(), plan.output.dtype)
    heatmaps = tuple(
        HeatmapResult(
            method=method,
            class_index=cls,
            class_label=meta.labels[cls],
            layer=result.layer,
            data=data,
        )
        for (method, cls), data in zip(keys, shaped, strict=True)
    )
    return ImageExplanation(
        predictions=_predictions(result, plan.top_predictions, meta),
        heatmaps=heatmaps,
        overlay_png=_overlay_png(prepared, raw[0]) if plan.output.overlay else b"",
    )
