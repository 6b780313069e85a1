"""Turns one image's engine result into its answer: predictions, shaped heatmaps, an overlay.

Runs on CPU worker threads after the batch, so upsampling to large originals and PNG encoding
never hold up the engine. Heatmaps follow one normalisation rule at every resolution (see
`shape_heatmaps`), the overlay too. Pixel attributions' maps are at the input's resolution (so
also "at the feature map's"); their display normalisation may clip at the 99th percentile
first, and raw they are the unreduced 3xHxW attributions at the input's resolution.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch

from camserve.server.engine import MapScores, RowResult
from camserve.server.engine.gradient_rows import delta_kind
from camserve.server.engine.shaping import shape_heatmaps
from camserve.server.engine.types import attribution_kind
from camserve.server.inspect_outputs import shape_inspection
from camserve.server.metrics import StageClock, untimed
from camserve.server.preprocess import PreparedImage
from camserve.server.records import HeatmapResult, ImageExplanation, ModelMeta, Prediction
from camserve.server.validation import ExplainPlan, OutputPlan
from camserve.v1 import explain_pb2 as pb
from camserve.v1.render import blend
from camserve.v1.tensors import dtype_name

# zlib level of overlay PNGs: level 1 encodes a photo-sized overlay several times faster than
# Pillow's default 6, for files about a fifth larger (benchmarks/ceiling.py, README).
PNG_LEVEL = 1
RESOLUTION_NAMES: dict[int, str] = {
    pb.RESOLUTION_FEATURE_MAP: "feature",
    pb.RESOLUTION_INPUT: "input",
    pb.RESOLUTION_ORIGINAL: "original",
    pb.RESOLUTION_EXPLICIT: "explicit",
}


def _shape(maps: torch.Tensor, prepared: PreparedImage, output: OutputPlan) -> list:
    """(K, h, w) raw maps at the resolution and in the dtype the caller asked for."""
    return list(
        shape_heatmaps(
            maps,
            prepared.geometry,
            RESOLUTION_NAMES[output.resolution],
            output.size,
            normalised=not output.raw,
            dtype=dtype_name(output.dtype),
        )
    )


def _overlay_png(prepared: PreparedImage, first_map: torch.Tensor) -> bytes:
    assert prepared.original is not None
    heatmap = shape_heatmaps(first_map[None], prepared.geometry, "original", dtype="uint8")[0]
    buffer = io.BytesIO()
    blend(prepared.original, heatmap).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def _predictions(result: RowResult, count: int, meta: ModelMeta) -> tuple[Prediction, ...]:
    probabilities, indices = torch.topk(result.probabilities, count)
    logits = result.logits[indices]
    return tuple(
        Prediction(index=i, label=meta.labels[i], probability=p, logit=logit)
        for i, p, logit in zip(
            indices.tolist(), probabilities.tolist(), logits.tolist(), strict=True
        )
    )


def _curves(scores: MapScores | None) -> dict[str, tuple[float, ...]]:
    if scores is None:
        return {}
    curves = {"deletion_auc": scores.deletion, "insertion_auc": scores.insertion}
    return {name: curve.probabilities for name, curve in curves.items() if curve is not None}


def _display(raw: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Pixel maps (K, H, W) ready for min-max normalisation: clipped at each map's 99th
    percentile first for `percentile_99` (PAIR's display), as they are for min-max."""
    if normalisation != "percentile_99" or raw.numel() == 0:
        return raw
    ceiling = torch.quantile(raw.flatten(1), 0.99, dim=1)
    return torch.minimum(raw, ceiling[:, None, None])


def _attribution(result: RowResult, method: str, cls: int, dtype: int) -> np.ndarray:
    """A pixel method's unreduced (3, H, W) attribution at the input's resolution."""
    k = result.classes.index(cls)
    values = result.outputs[attribution_kind(method)][k].float()
    return values.to(torch.float16).numpy() if dtype == pb.DTYPE_FLOAT16 else values.numpy()


def _shaped(
    result: RowResult,
    keys: list[tuple[str, int]],
    prepared: PreparedImage,
    plan: ExplainPlan,
    meta: ModelMeta,
) -> tuple[dict[tuple[str, int], np.ndarray], torch.Tensor]:
    """Every heatmap by key, and the first one's map as the overlay draws it. CAMs and pixel
    maps are shaped apart (their raw maps differ in size); raw pixel maps are attributions."""
    pixel = [key for key in keys if meta.method_info[key[0]].pixel]
    cams = [key for key in keys if not meta.method_info[key[0]].pixel]
    found: dict[tuple[str, int], np.ndarray] = {}
    first: torch.Tensor | None = None
    if cams:
        raw = torch.stack([result.maps[key] for key in cams]).float()
        found.update(zip(cams, _shape(raw, prepared, plan.output), strict=True))
        first = raw[0] if keys[0] in cams else None
    if pixel and plan.output.raw:
        found.update({key: _attribution(result, *key, plan.output.dtype) for key in pixel})
    if pixel:
        maps = _display(
            torch.stack([result.maps[key] for key in pixel]).float(), plan.pixel.normalisation
        )
        if not plan.output.raw:
            found.update(zip(pixel, _shape(maps, prepared, plan.output), strict=True))
        first = maps[0] if keys[0] in pixel else first
    assert first is not None, "a request explains at least one map"
    return found, first


def _delta(result: RowResult, method: str, cls: int) -> float | None:
    deltas = result.outputs.get(delta_kind(method))
    return None if deltas is None else float(deltas[result.classes.index(cls)])


def explain_image(
    result: RowResult,
    prepared: PreparedImage,
    plan: ExplainPlan,
    meta: ModelMeta,
    scores: Mapping[tuple[str, int], MapScores] | None = None,
    *,
    timed: StageClock = untimed,
) -> ImageExplanation:
    """One image's predictions and heatmaps, ordered by class (as explained), then method, each
    with its faithfulness scores when the plan asked for them (`scores`, keyed like the maps),
    and its feature maps and gate values (`inspect_outputs`). A plan without heatmaps has no
    predictions either: its pass may have stopped before the logits."""
    scores = scores or {}
    with timed("shape"):
        features, gates = shape_inspection(result, prepared.geometry, plan.inspect, meta)
        if not plan.inspect.heatmaps:
            return ImageExplanation((), (), b"", features, gates)
        keys = [(method, cls) for cls in result.classes for method in plan.methods]
        shaped, first = _shaped(result, keys, prepared, plan, meta)
        heatmaps = tuple(
            HeatmapResult(
                method=method,
                class_index=cls,
                class_label=meta.labels[cls],
                layer=result.layer,
                data=shaped[(method, cls)],
                scores=scores[(method, cls)].values() if (method, cls) in scores else {},
                curves=_curves(scores.get((method, cls))) if plan.score_curves else {},
                convergence_delta=_delta(result, method, cls),
            )
            for method, cls in keys
        )
        predictions = _predictions(result, plan.top_predictions, meta)
    overlay = b""
    if plan.output.overlay:
        with timed("overlay"):
            overlay = _overlay_png(prepared, first)
    return ImageExplanation(
        predictions=predictions,
        heatmaps=heatmaps,
        overlay_png=overlay,
        feature_maps=features,
        gates=gates,
    )
