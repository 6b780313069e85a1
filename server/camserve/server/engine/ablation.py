"""AblationCAM (Desai & Ramaswamy): a channel's weight is how much the class score drops
without it. Pure functions; `camserve.server.engine.gradient_free` runs them.

For one image with target-layer output A (C, h, w) and target-class logit y:
- row c of the follow-up is A with channel c ablated: set to 0 when min(A) is 0 (the usual
  post-ReLU case), else to min(A) - 1e7 (`ablation_value`);
- those rows run through the layers after the target only (`CamEngine.predict_tail`), giving
  the ablated logits y_c;
- weight_c = (y - y_c) / y, and the map is ReLU(sum_c weight_c A_c) (`ablation_cam`).

This is pytorch-grad-cam 1.5.7's AblationCAM with all channels ablated. One difference, in the
non-zero-minimum case only: its `AblationLayer` edits its batch in place and reads the minimum
again for each row, so the k-th row of each of its batches gets min(A) - k * 1e7. camserve gives
every channel min(A) - 1e7, what pytorch-grad-cam computes with `batch_size=1`, so results do
not depend on how rows are chunked.
"""

from __future__ import annotations

import torch

from camserve.server.engine.methods import from_weights
from camserve.server.engine.types import EngineError

ABLATION_OFFSET = 1e7


def check_range(channels: int, start: int, stop: int) -> None:
    """Checks that [start, stop) is a non-empty channel range of a layer with `channels`."""
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= channels):
        raise EngineError(
            f"channel range [{start}, {stop}) is not a non-empty range inside the layer's "
            f"{channels} channels; use 0 <= start < stop <= {channels}"
        )


def ablation_value(activation: torch.Tensor) -> torch.Tensor:
    """The value an ablated channel takes: 0 if the activation's minimum is 0, else far below.

    A 0-d tensor on the activation's device: reading the minimum on the host would make every
    piece of the follow-up wait for the device.
    """
    minimum = activation.min()
    return torch.where(minimum == 0, torch.zeros_like(minimum), minimum - ABLATION_OFFSET)


def ablated_rows(activation: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(stop - start, C, h, w): `activation` (C, h, w) with channel start + i ablated in row i.

    Same device, dtype and memory layout as `activation`, so the rows feed the tail directly.
    """
    if activation.dim() != 3:
        raise EngineError(f"activation must be (C, h, w), got shape {tuple(activation.shape)}")
    channels = int(activation.shape[0])
    check_range(channels, start, stop)
    count = stop - start
    layout = (
        torch.channels_last
        if activation[None].is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    rows = torch.empty(
        (count, *activation.shape),
        dtype=activation.dtype,
        device=activation.device,
        memory_format=layout,
    )
    rows.copy_(activation.expand(count, *activation.shape))
    index = torch.arange(count, device=activation.device)
    rows[index, index + start] = ablation_value(activation)
    return rows


def ablation_cam(
    activation: torch.Tensor,
    original: torch.Tensor,
    ablated: torch.Tensor,
    *,
    eigen_smooth: bool = False,
) -> torch.Tensor:
    """Maps (K, h, w) from the un-ablated logits `original` (K,) of the K explained classes and
    their logits `ablated` (K, C) with each channel ablated in turn."""
    channels = int(activation.shape[0])
    if ablated.dim() != 2 or ablated.shape[1] != channels or original.shape != ablated.shape[:1]:
        raise EngineError(
            f"ablated scores must be (K, {channels}) with original (K,), got "
            f"{tuple(ablated.shape)} and {tuple(original.shape)}"
        )
    original = original.float()[:, None]
    weights = (original - ablated.float()) / original
    return from_weights(activation, weights, eigen_smooth=eigen_smooth)
