"""The first principal component of a feature map: EigenCAM, EigenGradCAM and eigen_smooth.

Each (S, C) matrix (S = h * w positions, C channels) has its columns centred, then is projected on
its first right singular vector: an (S,) map that no longer depends on any per-channel sign.

Sign convention. A singular vector is defined only up to sign, so the projection is too. The
engine does what pytorch-grad-cam does: no correction; the sign is the one LAPACK's `sgesdd`
returns through `numpy.linalg.svd` on the float32 matrix, centred with pytorch-grad-cam's own
float32 steps. Equal matrices therefore get equal signs, on every device. The thin SVD is used;
its first singular vector is the one of the full SVD that pytorch-grad-cam asks for, at a
fraction of the cost.

Why the SVD runs on the host. No rule computable on the device reproduces LAPACK's sign:
`torch.linalg.svd` picks the other sign for about a quarter of random activation matrices, even
on the CPU, and simple rules (the singular vector's largest component positive, the
projection's sum positive, its first entry positive) each agree with LAPACK on only 40-70% of
them. The work is therefore split in two: `prepare` lays the matrices out on their device (no
synchronisation), and `project` centres them and runs the SVD on the CPU once they are there.
The engine moves the prepared matrices with the rest of a batch's results in its single
transfer to the host (`camserve.server.engine.transfer`), so the eigen methods add no
synchronisation, only bytes to that copy; `first_component` does both steps for other callers.

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

from camserve.server.engine import transfer

_BLAS_LOCK = threading.Lock()


@functools.cache
def _controller() -> ThreadpoolController:
    """Built on first use, not at import: it inspects the loaded native libraries."""
    return ThreadpoolController()


def _svd_vt(array: np.ndarray) -> np.ndarray:
    with _BLAS_LOCK, _controller().limit(limits=1, user_api="blas"):
        return np.linalg.svd(array, full_matrices=False)[2]


def prepare(matrices: torch.Tensor) -> torch.Tensor:
    """(..., S, C) -> (..., C, S): the matrices as `project` reads them, on their own device.

    float32, NaNs read as zeros (as pytorch-grad-cam reads them), channel-major and contiguous.
    """
    x = matrices.detach().float()
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    return x.movedim(-1, -2).contiguous()


def project(by_channel: torch.Tensor) -> torch.Tensor:
    """(..., C, S) on the CPU, from `prepare` -> (..., S) float32 on the CPU: each matrix's
    centred rows projected on its first right singular vector.

    The float32 arithmetic mirrors pytorch-grad-cam's step by step (its (S, C) matrices are
    transposed views of (C, S) arrays, which decides numpy's summation order), so that equal
    inputs give bit-equal matrices to the SVD and hence the same sign.
    """
    stack, positions = tuple(by_channel.shape[:-2]), int(by_channel.shape[-1])
    if by_channel.numel() == 0 or positions == 0:
        return torch.zeros((*stack, positions))
    rows = by_channel.numpy().swapaxes(-1, -2)  # (..., S, C), a view as in pytorch-grad-cam
    centred = rows - rows.mean(axis=-2, keepdims=True)
    vt = _svd_vt(centred)
    projection = np.empty((*stack, positions), dtype=np.float32)
    for index in np.ndindex(*stack):
        projection[index] = centred[index] @ vt[index][0, :]
    return torch.from_numpy(projection)


def first_component(matrices: torch.Tensor) -> torch.Tensor:
    """(..., S, C) -> (..., S) float32 on the input's device: `prepare`, one transfer to the
    host, `project`. NaNs count as zeros."""
    (host,) = transfer.to_host([prepare(matrices)])
    return project(host).to(matrices.device)
