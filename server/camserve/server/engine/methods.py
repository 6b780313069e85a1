"""The five CAM methods as pure functions of activations A and gradients dY/dA.

Each takes `activations` and `gradients` of shape (..., C, h, w) that broadcast against each other
(the engine passes (R, C, h, w) activations with (K, R, C, h, w) gradients: K classes for R images)
and returns (..., h, w) ReLU'd, unnormalised maps. The definitions (epsilons included) follow
pytorch-grad-cam 1.5.7 so results can be checked against it; the arithmetic is always float32,
whatever precision the forward pass ran in, because Grad-CAM++ cubes gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SPATIAL = (-2, -1)
_GRADCAMPP_EPS = 1e-6
_XGRADCAM_EPS = 1e-7


def _weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_c weights[..., c] * A[..., c, :, :], ReLU'd; a matmul, so no (..., C, h, w) product."""
    height, width = activations.shape[-2:]
    flat = activations.flatten(-2)  # (..., C, h*w)
    cam = (weights.unsqueeze(-2) @ flat).squeeze(-2)  # (..., h*w)
    return cam.unflatten(-1, (height, width)).clamp_(min=0)


def gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Channel weights are the spatial mean of the gradients (Selvaraju et al.)."""
    return _weighted_sum(gradients.mean(dim=_SPATIAL), activations)


def gradcampp(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., eq. 19) with pytorch-grad-cam's closed-form alphas."""
    grads_2 = gradients.square()
    grads_3 = grads_2 * gradients
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + _GRADCAMPP_EPS)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (gradients.clamp(min=0) * alpha).sum(dim=_SPATIAL)
    return _weighted_sum(weights, activations)


def xgradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al.): gradients weighted by the normalised activations."""
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True)
    weights = (gradients * activations / (sum_activations + _XGRADCAM_EPS)).sum(dim=_SPATIAL)
    return _weighted_sum(weights, activations)


def hirescam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin): element-wise gradient x activation, summed over channels."""
    return (gradients * activations).sum(dim=-3).clamp_(min=0)


def layercam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al.): positive gradients x activation, summed over channels."""
    return (gradients.clamp(min=0) * activations).sum(dim=-3).clamp_(min=0)


CAM_FUNCTIONS: dict[str, CamFn] = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "layercam": layercam,
}


def compute(method: str, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Maps for `method`, computed in float32 from (..., C, h, w) activations and gradients."""
    return CAM_FUNCTIONS[method](activations.float(), gradients.float())
