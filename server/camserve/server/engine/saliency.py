"""Pixel attributions: the arithmetic from the gradient at the input to a method's map.

Every pixel method makes a (3, H, W) attribution per image and class at the model input's
resolution, then one (H, W) map by a named channel reduction:

- `saliency` (Simonyan et al.): the gradient g of the class score (the pre-softmax logit);
- `input_x_gradient`: x * g;
- `guided_backprop` (Springenberg et al.): the gradient with the guided rule at every ReLU and
  ReLU6 (`activations`);
- `guided_gradcam` (Selvaraju et al., section 3): guided backprop times the target layer's
  Grad-CAM map (ReLU'd, unnormalised) upsampled bilinearly to the input;
- `smoothgrad` (Smilkov et al.): the mean gradient over n copies of x + N(0, sigma^2) with
  sigma = noise x (max - min) of x, as PAIR saliency and MONAI do;
- `integrated_gradients` (Sundararajan et al.): (x - b) * sum_i w_i g(b + a_i (x - b)) with
  Captum's quadrature rules (`quadrature`), and Captum's convergence delta.

Reductions: `max_abs` (max_c |a_c|, the default for the gradient methods), `sum_abs`, and `sum`
(signed, the default for input x gradient and IG, whose attributions add up to the change of
the score). The maps stay unnormalised here; display normalisation is the response's concern.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from camserve.server.engine.types import EngineError

REDUCTIONS = ("max_abs", "sum_abs", "sum")
QUADRATURES = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)
BASELINES = ("zero", "black")
DEFAULT_SAMPLES = 25
DEFAULT_NOISE = 0.15
DEFAULT_STEPS = 50
_CHANNELS = -3


def reduce_channels(attributions: torch.Tensor, reduction: str) -> torch.Tensor:
    """(..., 3, H, W) -> (..., H, W) by `reduction` (see the module docstring)."""
    if reduction == "max_abs":
        return attributions.abs().amax(dim=_CHANNELS)
    if reduction == "sum_abs":
        return attributions.abs().sum(dim=_CHANNELS)
    if reduction == "sum":
        return attributions.sum(dim=_CHANNELS)
    raise EngineError(f"reduction {reduction!r}: use one of {REDUCTIONS}")


def upsampled_cam(cams: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """(K, N, h, w) Grad-CAM maps -> (K, N, 1, H, W), bilinear with half-pixel centres (the
    paper's upsampling; Captum's GuidedGradCam defaults to nearest)."""
    k, n, h, w = cams.shape
    up = F.interpolate(cams.reshape(k * n, 1, h, w), size=input_hw, mode="bilinear")
    return up.reshape(k, n, 1, *input_hw)


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(step sizes, alphas) of `steps` points on [0, 1], as Captum's `approximation_parameters`
    gives them for the same method name."""
    if method == "gausslegendre":
        if steps < 1:
            raise EngineError(f"steps must be >= 1 for gausslegendre, got {steps}")
        points, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + points)).tolist()
    if method not in QUADRATURES:
        raise EngineError(f"quadrature {method!r}: use one of {QUADRATURES}")
    if steps < 2:
        raise EngineError(f"steps must be >= 2 for {method}, got {steps}")
    sizes = [1 / steps] * steps
    if method == "riemann_trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        return sizes, torch.linspace(0, 1, steps).tolist()
    ends: dict[str, tuple[float, float]] = {
        "riemann_left": (0.0, 1 - 1 / steps),
        "riemann_middle": (1 / (2 * steps), 1 - 1 / (2 * steps)),
        "riemann_right": (1 / steps, 1.0),
    }
    low, high = ends[method]
    return sizes, torch.linspace(low, high, steps).tolist()


def noise_sigma(image: torch.Tensor, noise: float) -> float:
    """SmoothGrad's sigma for one (3, H, W) model input: noise x (max - min)."""
    low, high = torch.aminmax(image.float())
    return float(noise * (high - low))


def noisy_copies(
    image: torch.Tensor, sigma: float, seed: int, start: int, stop: int
) -> torch.Tensor:
    """Copies [start, stop) of `image` plus Gaussian noise, each copy's noise drawn from its own
    generator seeded (seed, copy), so any chunking gives the same copies."""
    copies = []
    for copy in range(start, stop):
        generator = torch.Generator(device=image.device)
        generator.manual_seed(_mix(seed, copy))
        noise = torch.randn(
            image.shape, generator=generator, device=image.device, dtype=torch.float32
        )
        copies.append(image.float() + sigma * noise)
    return torch.stack(copies)


def _mix(seed: int, copy: int) -> int:
    """A 63-bit generator seed from the request's seed and the copy's index."""
    return (seed * 1_000_003 + copy * 7_919 + 1) % (2**63 - 1)


def path_points(
    image: torch.Tensor, baseline: torch.Tensor, alphas: list[float], start: int, stop: int
) -> torch.Tensor:
    """Points b + a_i (x - b) for i in [start, stop), as (stop - start, 3, H, W)."""
    a = torch.tensor(alphas[start:stop], dtype=torch.float32, device=image.device)
    delta = (image.float() - baseline)[None]
    return baseline[None] + a[:, None, None, None] * delta


def baseline_for(
    kind: str, image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """The IG baseline for a normalised (3, H, W) input: zeros (the mean colour) or black."""
    if kind == "zero":
        return torch.zeros_like(image, dtype=torch.float32)
    if kind == "black":
        m = torch.tensor(mean, dtype=torch.float32, device=image.device)[:, None, None]
        s = torch.tensor(std, dtype=torch.float32, device=image.device)[:, None, None]
        return (-m / s).expand(image.shape).clone()
    raise EngineError(f"baseline {kind!r}: use one of {BASELINES}")


def convergence_delta(
    attributions: torch.Tensor, score: torch.Tensor, baseline_score: torch.Tensor
) -> torch.Tensor:
    """Captum's delta per class: sum of the (K, 3, H, W) attributions - (y(x) - y(b))."""
    total = attributions.double().flatten(1).sum(dim=1)
    return total - (score.double() - baseline_score.double())


# A pass attribution from (x (N, 3, H, W), plain g (K, N, 3, H, W) or None, guided g or None,
# upsampled Grad-CAM (K, N, 1, H, W) or None) -> (K, N, 3, H, W).
Attribution = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]


def _need(tensor: torch.Tensor | None, what: str) -> torch.Tensor:
    if tensor is None:
        raise EngineError(f"this method needs {what}")
    return tensor


Optional = torch.Tensor | None


def gradient(x: torch.Tensor, plain: Optional, guided: Optional, cam: Optional) -> torch.Tensor:
    return _need(plain, "the gradient at the input")


def input_x_gradient(
    x: torch.Tensor, plain: Optional, guided: Optional, cam: Optional
) -> torch.Tensor:
    return x.float()[None] * _need(plain, "the gradient at the input")


def guided_gradient(
    x: torch.Tensor, plain: Optional, guided: Optional, cam: Optional
) -> torch.Tensor:
    return _need(guided, "the guided gradient at the input")


def guided_gradcam(
    x: torch.Tensor, plain: Optional, guided: Optional, cam: Optional
) -> torch.Tensor:
    return _need(guided, "the guided gradient") * _need(cam, "the Grad-CAM map")


def integrated(
    image: torch.Tensor, baseline: torch.Tensor, weighted_sum: torch.Tensor
) -> torch.Tensor:
    """IG attributions (K, 3, H, W) from the step-size-weighted sum of the path's gradients."""
    return (image.float() - baseline)[None] * weighted_sum


def check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise EngineError(f"{name} must be a positive finite number, got {value!r}")
