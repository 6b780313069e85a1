"""The inspection run of `benchmarks/engine.py --inspection`: what feature maps cost.

Two cases, each timed by alternating its two contenders run by run after a warm-up; the ratio is
the median of per-round ratios (runs of one round see about the same machine load):

- explain_with_feature_maps_over_explain: Grad-CAM at `layer4` plus the first 16 channels of
  three layers (`layer1`, `layer2`, `layer3`) for every image, over Grad-CAM alone. The maps come
  from the same forward and the same transfer, so the target is at most 1.05 at batch 32.
- feature_maps_only_over_forward: the same three layers' channels and nothing else (no heatmaps:
  forward only, stopped after `layer3`), over a plain inference forward of the whole model
  (`CamEngine.predict`). The target is at most 1.0; less, since the pass stops early.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from camserve.server.engine import CamEngine, RowRequest
from camserve.server.engine.types import FeatureAsk, Inspection

LAYERS = ("layer1", "layer2", "layer3")
CHANNELS = 16
TARGETS = {"explain_with_feature_maps_over_explain": 1.05, "feature_maps_only_over_forward": 1.0}


def _median_ratio(
    numerator: Callable[[], object], denominator: Callable[[], object], repeats: int
) -> float:
    for fn in (numerator, denominator):  # warm-up
        fn()
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        numerator()
        middle = time.perf_counter()
        denominator()
        end = time.perf_counter()
        ratios.append((middle - start) / (end - middle))
    return statistics.median(ratios)


def run_inspection(model: str, batch: int, size: int, repeats: int) -> list[dict[str, object]]:
    """Both cases' rows for one model and batch, on the CPU in float32."""
    torch.manual_seed(0)
    engine = CamEngine(torchvision.models.get_model(model, weights=None).eval())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    inspection = Inspection(features=tuple(FeatureAsk(layer, count=CHANNELS) for layer in LAYERS))
    plain = [RowRequest("layer4")] * batch
    inspected = [RowRequest("layer4", inspection=inspection)] * batch
    only = [RowRequest("layer4", methods=(), inspection=inspection)] * batch
    with_maps = _median_ratio(
        lambda: engine.explain_batch(x, inspected), lambda: engine.explain_batch(x, plain), repeats
    )
    alone = _median_ratio(lambda: engine.explain_batch(x, only), lambda: engine.predict(x), repeats)
    return [
        {"case": "explain_with_feature_maps_over_explain", "batch": batch, "ratio": with_maps},
        {"case": "feature_maps_only_over_forward", "batch": batch, "ratio": alone},
    ]


def table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'case':<42}{'batch':>6}{'ratio':>8}{'target':>8}"]
    for row in rows:
        case = str(row["case"])
        lines.append(f"{case:<42}{row['batch']:>6}{row['ratio']:>8.3f}{TARGETS[case]:>8.2f}")
    return "\n".join(lines)
