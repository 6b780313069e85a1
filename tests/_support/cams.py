"""pytorch-grad-cam as the reference for the engine tests, and camserve's maps scaled its way.

pytorch-grad-cam returns each map at the input's size, min-max scaled; camserve returns raw maps
at the layer's size. The parity tests compare `normalise(to_input(...))` of camserve's maps with
the reference's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camserve.server.engine import (
    CamEngine,
    RowRequest,
    RowResult,
    explain_all,
    normalise,
    to_input,
)
from camserve.server.engine.gradient_free import DEFAULT_CHUNK_ROWS

# The five gradient-weighted methods, in camserve's order.
GRADIENT_WEIGHTED_REFERENCES: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
}
# Every method camserve computes in one forward and backward pass, in camserve's order.
SINGLE_PASS_REFERENCES: dict[str, type[BaseCAM]] = {
    **GRADIENT_WEIGHTED_REFERENCES,
    "gradcamelementwise": GradCAMElementWise,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
}
# The methods camserve computes from forward-only rows after an explain pass.
GRADIENT_FREE_REFERENCES: dict[str, type[BaseCAM]] = {
    "ablationcam": AblationCAM,
    "scorecam": ScoreCAM,
}


def _per_image(classes: int | Sequence[int], count: int) -> list[int]:
    return [classes] * count if isinstance(classes, int) else list(classes)


def reference_cam(
    cam_class: type[BaseCAM],
    model: nn.Module,
    layer: str,
    batch: torch.Tensor,
    classes: int | Sequence[int],
    *,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    **cam_options: Any,
) -> np.ndarray:
    """pytorch-grad-cam's `cam_class` at `layer` on `batch`: (N, H, W) maps of the logits of
    `classes` (one per image, or one int for every image). `cam_options` go to the CAM's
    constructor (AblationCAM's `batch_size`), the smoothing flags to its call."""
    with cam_class(model=model, target_layers=[model.get_submodule(layer)], **cam_options) as cam:
        targets = [ClassifierOutputTarget(c) for c in _per_image(classes, len(batch))]
        return cam(
            input_tensor=batch, targets=targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth
        )


def normalised_maps(
    results: Sequence[RowResult],
    method: str,
    classes: int | Sequence[int],
    size: tuple[int, int],
) -> torch.Tensor:
    """camserve's `method` maps of `classes` (one per result, or one int for every result),
    resized to the input's `size` and min-max scaled as pytorch-grad-cam scales its own:
    (N, H, W)."""
    per_row = _per_image(classes, len(results))
    return torch.stack(
        [
            normalise(to_input(r.maps[(method, c)], size))
            for r, c in zip(results, per_row, strict=True)
        ]
    )


def assert_maps_match_reference(
    results: Sequence[RowResult],
    method: str,
    classes: int | Sequence[int],
    size: tuple[int, int],
    expected: np.ndarray,
    err_msg: str = "",
    atol: float = 1e-4,
) -> None:
    """camserve's normalised `method` maps equal the reference's `expected` maps to `atol`."""
    ours = normalised_maps(results, method, classes, size).numpy()
    np.testing.assert_allclose(ours, expected, atol=atol, err_msg=err_msg or method)


def assert_method_matches_reference(
    engine: CamEngine,
    model: nn.Module,
    method: str,
    layer: str,
    batch: torch.Tensor,
    classes: int | Sequence[int],
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    **cam_options: Any,
) -> None:
    """One `method` row per image of `batch`, explaining its class of `classes` at `layer`, run
    to the end by `explain_all` in chunks of `chunk_rows`, equals pytorch-grad-cam's CAM for
    `method` on `model` (built with `cam_options`)."""
    per_image = _per_image(classes, len(batch))
    rows = [RowRequest(layer, (method,), classes=(c,)) for c in per_image]
    results = explain_all(engine, batch, rows, chunk_rows=chunk_rows)
    cam_class = {**SINGLE_PASS_REFERENCES, **GRADIENT_FREE_REFERENCES}[method]
    expected = reference_cam(cam_class, model, layer, batch, per_image, **cam_options)
    size = (int(batch.shape[-2]), int(batch.shape[-1]))
    assert_maps_match_reference(results, method, per_image, size, expected)
