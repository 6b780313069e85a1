"""The five CAM methods as pure functions of activations A and gradients dY/dA.

Feature maps are laid out channels-last and flattened: (..., S, C) with S = h * w spatial
positions and C channels. That is the layout convolutions already produce under channels_last
(a free view), and it keeps every elementwise op on contiguous memory. `activations` (R, S, C)
broadcast against `gradients` (K, R, S, C): K classes for R images; each function returns
(K, R, S) ReLU'd, unnormalised maps.

The definitions (epsilons included) follow pytorch-grad-cam 1.5.7 so results can be checked
against it. The arithmetic is float32 whatever precision the forward pass ran in, because
Grad-CAM++ cubes gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SPATIAL = -2
_CHANNELS = -1
_GRADCAMPP_EPS = 1e-6
_XGRADCAM_EPS = 1e-7


def _weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_c weights[k, r, c] * A[r, s, c], ReLU'd, with no (K, R, S, C) temporary.

    einsum picks a good batched-matmul layout; a plain `A @ w[..., None]` runs as one slow
    matrix-vector product per image.
    """
    return torch.einsum("rsc,krc->krs", activations, weights).clamp_(min=0)


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Channel weights are the spatial mean of the gradients (Selvaraju et al.)."""
    return _weighted_sum(gradients.mean(dim=_SPATIAL), activations)


def gradcampp(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., eq. 19) with pytorch-grad-cam's closed-form alphas."""
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True)
    grads_2 = gradients.square()
    # alpha = g^2 / (2 g^2 + sum(A) g^3 + eps), in place to spare temporaries. pytorch-grad-cam
    # also zeroes alpha where g == 0; there relu(g) is 0 and alpha is 0 / eps = 0 anyway.
    denominator = (grads_2 * gradients).mul_(sum_activations).add_(grads_2, alpha=2)
    alpha = grads_2.div_(denominator.add_(_GRADCAMPP_EPS))
    weights = gradients.clamp(min=0).mul_(alpha).sum(dim=_SPATIAL)
    return _weighted_sum(weights, activations)


def xgradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al.): gradients weighted by the normalised activations.

    The per-channel activation sums are accumulated in float64: the weights divide by them, and
    for normalised features (a transformer's LayerNorm outputs) some come close to zero, where
    float32 rounding of a long sum would show in the map.
    """
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True, dtype=torch.float64).float()
    weights = (gradients * activations).div_(sum_activations + _XGRADCAM_EPS).sum(dim=_SPATIAL)
    return _weighted_sum(weights, activations)


def hirescam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin): element-wise gradient x activation, summed over channels."""
    return (gradients * activations).sum(dim=_CHANNELS).clamp_(min=0)


def layercam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al.): positive gradients x activation, summed over channels."""
    return gradients.clamp(min=0).mul_(activations).sum(dim=_CHANNELS).clamp_(min=0)


CAM_FUNCTIONS: dict[str, CamFn] = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "layercam": layercam,
}


def flat_channels_last(feature_maps: torch.Tensor) -> torch.Tensor:
    """(..., C, h, w) -> (..., h * w, C) float32; a view when the input is channels_last."""
    moved = feature_maps.float().movedim(-3, -1)
    return moved.reshape(*moved.shape[:-3], -1, moved.shape[-1])


def compute(method: str, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Maps (K, R, h, w) for `method` from (R, C, h, w) activations, (K, R, C, h, w) gradients."""
    height, width = activations.shape[-2:]
    cams = CAM_FUNCTIONS[method](flat_channels_last(activations), flat_channels_last(gradients))
    return cams.unflatten(-1, (height, width))
