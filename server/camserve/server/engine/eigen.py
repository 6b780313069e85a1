"""The first principal component of a feature map: EigenCAM, EigenGradCAM and eigen_smooth.

Each (S, C) matrix (S = h * w positions, C channels) has its columns centred, then is projected on
its first right singular vector: an (S,) map that no longer depends on any per-channel sign.

Sign convention. A singular vector is defined only up to sign, so the projection is too. The
engine does what pytorch-grad-cam does: no correction; the sign is the one LAPACK's `sgesdd`
returns through `numpy.linalg.svd` on the float32 matrix, centred with pytorch-grad-cam's own
float32 steps. Equal matrices therefore get equal signs, on every device: the SVD always runs on
the CPU with numpy, because `torch.linalg.svd`'s LAPACK picks the other sign for about half of
all matrices. The thin SVD is used; its first singular vector is the one of the full SVD that
pytorch-grad-cam asks for, at a fraction of the cost.

The sign stays arbitrary in two ways, as in pytorch-grad-cam. LAPACK's choice is not a
continuous function of the matrix: for a rank-deficient matrix (channels whose weight is zero,
say) last-bit differences in the input, such as a channels_last convolution or weights summed in
another order, can flip it; full-rank matrices computed in pytorch-grad-cam's layout match its
sign. And after the ReLU that follows, a projection that points away from the salient region
gives a map of its complement.

Threads: the matrices are small (49 x 2048 for a ResNet-50 at 224), and numpy's OpenBLAS worker
threads spinning against torch's own made each SVD 5-20x slower on a busy machine than on one
thread. The SVD therefore runs with OpenBLAS limited to one thread (threadpoolctl), under a lock
so that concurrent engines restore the previous limit correctly.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

_SPATIAL = -2
_BLAS_LOCK = threading.Lock()


@functools.cache
def _controller() -> ThreadpoolController:
    """Built on first use, not at import: it inspects the loaded native libraries."""
    return ThreadpoolController()


def _svd_vt(array: np.ndarray) -> np.ndarray:
    with _BLAS_LOCK, _controller().limit(limits=1, user_api="blas"):
        return np.linalg.svd(array, full_matrices=False)[2]


def first_component(matrices: torch.Tensor) -> torch.Tensor:
    """(..., S, C) -> (..., S): each matrix's centred rows projected on its first component.

    NaNs count as zeros. The float32 arithmetic mirrors pytorch-grad-cam's step by step (its
    (S, C) matrices are transposed views of (C, S) arrays, which decides numpy's summation
    order), so that equal inputs give bit-equal matrices to the SVD and hence the same sign.
    The result is float32 on the input's device.
    """
    device = matrices.device
    x = matrices.detach().float()
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    stack, positions = tuple(x.shape[:-2]), int(x.shape[-2])
    if x.numel() == 0 or positions == 0:
        return torch.zeros((*stack, positions), device=device)
    by_channel = x.movedim(-1, -2).contiguous().cpu().numpy()  # (..., C, S)
    rows = by_channel.swapaxes(-1, -2)  # (..., S, C), a view as in pytorch-grad-cam
    centred = rows - rows.mean(axis=-2, keepdims=True)
    vt = _svd_vt(centred)
    projection = np.empty((*stack, positions), dtype=np.float32)
    for index in np.ndindex(*stack):
        projection[index] = centred[index] @ vt[index][0, :]
    return torch.from_numpy(projection).to(device)
