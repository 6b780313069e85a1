"""Faithfulness scores of a heatmap: does the model's confidence follow the map?

Pure torch, no model and no autograd: each score is split into building perturbed images from
the model inputs and the maps (on whatever device they live), and combining the model's
probabilities for those images into a number. `scoring` plans and batches the rows.

Inputs: `images` are model inputs, already normalised (N, 3, H, W); `maps` are normalised heatmaps
at the input resolution (M, H, W) with values in [0, 1] (`normalise(to_input(raw, (H, W)))`).
Probabilities are the softmax of the model's logits for the map's class.

Scores (wire names):

- `confidence_change`: the class probability on the image multiplied by its map, relative to the
  probability on the image itself: (p_masked - p) / p, computed as expm1(log p_masked - log p) so
  that classes with a tiny probability keep a finite, exact value. Negative means the confidence
  dropped. p_masked - p is pytorch-grad-cam's `CamMultImageConfidenceChange` with a
  `ClassifierOutputSoftmaxTarget` (its `DropInConfidence` is max(p - p_masked, 0) and its
  `IncreaseInConfidence` is p_masked > p); max(-change, 0) is torch-cam's per-image average drop
  (up to the 1e-7 it adds to p). One forward row per map.
- `deletion_auc` and `insertion_auc` (RISE, Petsiuk et al. 2018): pixels are ranked from the most
  to the least salient (a stable sort: equal values keep pixel order, row-major, so the ranking
  and the scores do not depend on anything but the map). With P = H * W pixels and S steps, step
  k in 0..S touches the c_k = floor(k * P / S) highest-ranked pixels, in every channel.
  Deletion replaces them with the baseline (the curve falls from p on the image to p on the
  baseline; low area = faithful); insertion reveals them on the baseline (rises from the baseline
  to the image; high area = faithful). Each curve has S + 1 points y_k at x_k = c_k / P and its
  area is the trapezoidal rule: sum over k < S of (x_{k+1} - x_k) * (y_k + y_{k+1}) / 2.
  The baseline is zero in normalised input space, i.e. the dataset's mean colour for inputs
  normalised as (x - mean) / std; it is torch-cam's `DeletionInsertionMetric` default and matches
  what multiplying by a zero map does to the image for `confidence_change`. The two ends of each
  curve are the unperturbed image (whose probabilities the explanation already computed) and the
  all-baseline image (the same for every map of a given size), so a curve costs S - 1 new rows
  per map, plus one baseline row shared by all maps scored together. (torch-cam steps by
  ceil(P / S) pixels: the same points when S divides P, fewer than S + 1 points otherwise.)

ROAD (Rong et al. 2022) is left out: its noisy linear imputation fills the removed pixels by
solving a sparse linear system per image and per threshold (pytorch-grad-cam calls scipy's direct
solver on the CPU, one image at a time). A batched version on the device would have to be an
iterative solver: it needs a number of dependent iterations that grows with the width of the
removed regions (hundreds for large holes in a 224 x 224 image), and it matches the direct
solution only to its tolerance, so parity with the reference could not be held to 1e-4. The
imputation also adds random noise, which would make a score depend on the random stream, hence on
which other rows shared its batch.
"""

from __future__ import annotations

import torch

from camserve.server.engine.types import EngineError

SCORES: tuple[str, ...] = ("confidence_change", "deletion_auc", "insertion_auc")
CURVE_SCORES: tuple[str, ...] = ("deletion_auc", "insertion_auc")
DEFAULT_STEPS = 20
# Each step is a forward row per map and curve: the bound keeps one request's cost predictable.
MAX_STEPS = 100


def check_steps(steps: object, num_pixels: int | None = None) -> int:
    """`steps` once checked to be an int in 1..MAX_STEPS (and at most the number of pixels)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise EngineError(
            f"steps must be an int from 1 to {MAX_STEPS}, got {steps!r}; "
            f"{DEFAULT_STEPS} is the usual choice"
        )
    if num_pixels is not None and steps > num_pixels:
        raise EngineError(
            f"steps is {steps} but the images have only {num_pixels} pixels; use at most "
            f"{num_pixels} steps"
        )
    return steps


def step_counts(num_pixels: int, steps: int) -> torch.Tensor:
    """(S + 1,) int64: c_k = floor(k * P / S), the pixels perturbed at step k."""
    k = torch.arange(steps + 1, dtype=torch.int64)
    return k * num_pixels // steps


def step_fractions(num_pixels: int, steps: int) -> torch.Tensor:
    """(S + 1,) float64: x_k = c_k / P, the curve's abscissae from 0 to 1."""
    return step_counts(num_pixels, steps).double() / num_pixels


def saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(M, H * W) int64: each pixel's rank, 0 for the most salient; ties keep pixel order."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def masked_images(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W): each image times its map, the input of `confidence_change`."""
    return images * maps[:, None].to(images.dtype)


def curve_images(
    images: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor, insertion: torch.Tensor
) -> torch.Tensor:
    """(R, 3, H, W): row r keeps the image where its pixel's rank < counts[r] if insertion[r],
    where rank >= counts[r] otherwise; everywhere else it holds the (zero) baseline.

    `images` (R, 3, H, W) and `ranks` (R, H * W) are already gathered per row; `counts` (R,) int
    and `insertion` (R,) bool are on the same device.
    """
    keep = (ranks < counts[:, None]) == insertion[:, None]
    flat = images.flatten(2)
    kept = torch.where(
        keep[:, None, :], flat, torch.zeros((), dtype=flat.dtype, device=flat.device)
    )
    return kept.view(images.shape)


def confidence_change(log_original: torch.Tensor, log_masked: torch.Tensor) -> torch.Tensor:
    """(p_masked - p) / p from log-probabilities: exact even when p underflows float32."""
    return torch.expm1(log_masked.double() - log_original.double())


def area_under_curve(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """(M,) trapezoidal areas of (M, S + 1) curves over the (S + 1,) abscissae, in float64."""
    return torch.trapezoid(curves.double(), fractions.double().to(curves.device), dim=-1)
