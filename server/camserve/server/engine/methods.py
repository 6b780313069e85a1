"""The single-pass CAM methods as pure functions of activations A and gradients dY/dA.

Feature maps are laid out channels-last and flattened: (..., S, C) with S = h * w spatial
positions and C channels. That is the layout convolutions already produce under channels_last
(a free view), and it keeps every elementwise op on contiguous memory. `activations` (R, S, C)
broadcast against `gradients` (K, R, S, C): K classes for R images.

Every method is a sum over channels of per-channel terms (`CamMethod.terms`, (K, R, S, C)). The
plain map is that sum, ReLU'd; `CamMethod.fast` computes it without materialising the terms.
With eigen_smooth, and always for EigenCAM and EigenGradCAM, the map is instead the first
principal component of the terms (`camserve.server.engine.eigen`), ReLU'd. EigenCAM works on the
raw activations (no ReLU before the projection) and ignores the gradients, as pytorch-grad-cam's.

A method runs in two steps so that a batch waits for its device only once: `start` does on the
device all that can be done there (every plain map; the laid-out matrices of a projection), the
engine moves every method's `PendingMaps.tensor` to the host in one transfer, and `finish`
completes the maps there (the projections' SVDs run on the CPU; see `eigen` for why).

The definitions (epsilons included) follow pytorch-grad-cam 1.5.7 so results can be checked
against it. The arithmetic is float32 whatever precision the forward pass ran in, because
Grad-CAM++ cubes gradients: activations and gradients are upcast before any of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from camserve.server.engine.eigen import first_component, prepare, project

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TermsFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

_SPATIAL = -2
_CHANNELS = -1
_GRADCAMPP_EPS = 1e-6
_XGRADCAM_EPS = 1e-7


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_c weights[k, r, c] * A[r, s, c], ReLU'd, with no (K, R, S, C) temporary.

    einsum picks a good batched-matmul layout; a plain `A @ w[..., None]` runs as one slow
    matrix-vector product per image.
    """
    return torch.einsum("rsc,krc->krs", activations, weights).clamp_(min=0)


def _weighted_terms(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return weights[..., None, :] * activations


def gradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Channel weights are the spatial mean of the gradients (Selvaraju et al.)."""
    return gradients.mean(dim=_SPATIAL)


def gradcampp_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., eq. 19) with pytorch-grad-cam's closed-form alphas."""
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True)
    grads_2 = gradients.square()
    # alpha = g^2 / (2 g^2 + sum(A) g^3 + eps), in place to spare temporaries. pytorch-grad-cam
    # also zeroes alpha where g == 0; there relu(g) is 0 and alpha is 0 / eps = 0 anyway.
    denominator = (grads_2 * gradients).mul_(sum_activations).add_(grads_2, alpha=2)
    alpha = grads_2.div_(denominator.add_(_GRADCAMPP_EPS))
    return gradients.clamp(min=0).mul_(alpha).sum(dim=_SPATIAL)


def xgradcam_weights(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al.): gradients weighted by the normalised activations.

    The per-channel activation sums are accumulated in float64: the weights divide by them, and
    for normalised features (a transformer's LayerNorm outputs) some come close to zero, where
    float32 rounding of a long sum would show in the map.
    """
    sum_activations = activations.sum(dim=_SPATIAL, keepdim=True, dtype=torch.float64).float()
    return (gradients * activations).div_(sum_activations + _XGRADCAM_EPS).sum(dim=_SPATIAL)


def _hirescam_terms(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin) and EigenGradCAM: element-wise gradient x activation."""
    return gradients * activations


def _layercam_terms(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al.): positive gradients x activation."""
    return gradients.clamp(min=0).mul_(activations)


def _elementwise_terms(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM element-wise: the positive part of gradient x activation."""
    return (gradients * activations).clamp_(min=0)


def _eigencam_terms(activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
    """EigenCAM (Muhammad & Yeasin): the raw activations, one map for every class."""
    return activations[None]


def _needing_gradients(terms: CamFn) -> TermsFn:
    def checked(activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        if gradients is None:
            raise ValueError("this method needs gradients")
        return terms(activations, gradients)

    return checked


def _channel_sum(terms: CamFn) -> CamFn:
    return lambda a, g: terms(a, g).sum(dim=_CHANNELS).clamp_(min=0)


def _weighted(weights: CamFn) -> CamFn:
    return lambda a, g: weighted_sum(weights(a, g), a)


def _weighted_terms_of(weights: CamFn) -> CamFn:
    return lambda a, g: _weighted_terms(weights(a, g), a)


@dataclass(frozen=True)
class CamMethod:
    """One method's arithmetic: its per-channel terms and, when it has one, a fast path for
    their sum. Which method uses which is stated by `camserve.server.engine.registry`."""

    terms: TermsFn  # (R, S, C) activations, (K, R, S, C) gradients -> (K or 1, R, S, C)
    fast: CamFn | None  # the ReLU'd channel sum; None: always the principal component


def _weighting(weights: CamFn) -> CamMethod:
    return CamMethod(_needing_gradients(_weighted_terms_of(weights)), _weighted(weights))


def _summing(terms: CamFn) -> CamMethod:
    return CamMethod(_needing_gradients(terms), _channel_sum(terms))


GRADCAM = _weighting(gradcam_weights)
GRADCAMPP = _weighting(gradcampp_weights)
XGRADCAM = _weighting(xgradcam_weights)
HIRESCAM = _summing(_hirescam_terms)
LAYERCAM = _summing(_layercam_terms)
GRADCAM_ELEMENTWISE = _summing(_elementwise_terms)
EIGENCAM = CamMethod(_eigencam_terms, None)
EIGENGRADCAM = CamMethod(_needing_gradients(_hirescam_terms), None)


def flat_channels_last(feature_maps: torch.Tensor) -> torch.Tensor:
    """(..., C, h, w) -> (..., h * w, C) float32; a view when the input is channels_last."""
    moved = feature_maps.float().movedim(-3, -1)
    return moved.reshape(*moved.shape[:-3], -1, moved.shape[-1])


@dataclass(frozen=True)
class PendingMaps:
    """One method's maps for some rows, on the device, waiting for the batch's transfer.

    `tensor` holds the finished maps (K, R, h, w) or, for a projected method, the matrices
    (K or 1, R, C, S) that `eigen.project` turns into maps on the host (see `eigen`); `finish`
    takes either once it is on the host.
    """

    tensor: torch.Tensor
    projected: bool
    depth: int  # K: the classes a projection is repeated for when it ignores them
    hw: tuple[int, int]


def start(
    kernel: CamMethod,
    activations: torch.Tensor,
    gradients: torch.Tensor | None,
    *,
    eigen_smooth: bool = False,
) -> PendingMaps:
    """`kernel`'s maps from (R, C, h, w) activations and (K, R, C, h, w) gradients, as far as
    the device takes them: all of them, or the matrices to project. No synchronisation.

    `gradients` may be None for a method that does not use them; the maps are then (1, R, h, w).
    Both are read as float32, whatever precision the forward pass ran in.
    """
    height, width = (int(side) for side in activations.shape[-2:])
    a = flat_channels_last(activations)
    g = None if gradients is None else flat_channels_last(gradients)
    depth = 1 if g is None else int(g.shape[0])
    if kernel.fast is not None and g is not None and not eigen_smooth:
        cams = kernel.fast(a, g).unflatten(-1, (height, width))
        return PendingMaps(cams, projected=False, depth=depth, hw=(height, width))
    matrices = prepare(kernel.terms(a, g))
    return PendingMaps(matrices, projected=True, depth=depth, hw=(height, width))


def finish(pending: PendingMaps, host: torch.Tensor) -> torch.Tensor:
    """The maps (K, R, h, w) from `pending.tensor` brought to the host as `host`.

    They own their memory: `host` may be a view of a transfer buffer that also holds other
    methods' matrices, which should not live as long as the maps.
    """
    if not pending.projected:
        return host.clone()
    cams = project(host).clamp_(min=0)
    if cams.shape[0] != pending.depth:
        cams = cams.expand(pending.depth, *cams.shape[1:])
    return cams.unflatten(-1, pending.hw)


def from_weights(
    activation: torch.Tensor, weights: torch.Tensor, *, eigen_smooth: bool = False
) -> torch.Tensor:
    """Maps (K, h, w) of one image's activation (C, h, w) weighted by (K, C) channel weights.

    The gradient-free methods end here: the ReLU'd weighted sum over channels or, with
    eigen_smooth, the first principal component of the weighted channels.
    """
    height, width = activation.shape[-2:]
    a = flat_channels_last(activation[None])  # (1, S, C)
    w = weights.to(a.device, torch.float32)[:, None, :]  # (K, 1, C)
    if eigen_smooth:
        cams = first_component(_weighted_terms(w, a)).clamp_(min=0)
    else:
        cams = weighted_sum(w, a)
    return cams[:, 0].unflatten(-1, (height, width))
