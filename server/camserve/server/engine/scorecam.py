"""Score-CAM (Wang et al.): a channel's weight is the class score of the input masked by that
channel. Pure functions; `camserve.server.engine.gradient_free` runs them.

For one image x (3, H, W) with target-layer output A (C, h, w):
- row c of the follow-up is x * M_c, where M_c is channel c upsampled to (H, W) (bilinear,
  align_corners=True: torch's `UpsamplingBilinear2d`) and min-max scaled to [0, 1] with a 1e-8
  epsilon (`masked_inputs`);
- the rows run through the whole model (`CamEngine.predict`), giving the logits s_c of each
  explained class;
- the weights are softmax_c(s_c) and the map is ReLU(sum_c weight_c A_c) (`score_cam`).

This is pytorch-grad-cam 1.5.7's ScoreCAM. Each row depends only on its own channel, so any
chunking of the channels gives the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from camserve.server.engine.ablation import check_range
from camserve.server.engine.methods import from_weights
from camserve.server.engine.types import EngineError

_EPS = 1e-8


def masked_inputs(
    image: torch.Tensor, activation: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """(stop - start, 3, H, W): `image` masked by channels [start, stop) of `activation`."""
    if image.dim() != 3 or activation.dim() != 3:
        raise EngineError(
            f"image must be (3, H, W) and activation (C, h, w), got {tuple(image.shape)} and "
            f"{tuple(activation.shape)}"
        )
    check_range(int(activation.shape[0]), start, stop)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    channels = activation[start:stop].float().to(image.device)[None]
    masks = F.interpolate(channels, size=size, mode="bilinear", align_corners=True)[0]
    flat = masks.flatten(1)
    low = flat.amin(dim=1)[:, None, None]
    high = flat.amax(dim=1)[:, None, None]
    masks = (masks - low) / (high - low + _EPS)
    return image.float()[None] * masks[:, None]


def score_cam(
    activation: torch.Tensor, scores: torch.Tensor, *, eigen_smooth: bool = False
) -> torch.Tensor:
    """Maps (K, h, w) from the logits `scores` (K, C) of the K explained classes, one column per
    masked input."""
    channels = int(activation.shape[0])
    if scores.dim() != 2 or scores.shape[1] != channels:
        raise EngineError(f"scores must be (K, {channels}), got {tuple(scores.shape)}")
    weights = torch.softmax(scores.float(), dim=-1)
    return from_weights(activation, weights, eigen_smooth=eigen_smooth)
