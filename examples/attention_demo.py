"""A model with attention gates for trying `camserve attention` without training one.

The pretrained built-in EfficientNet-Lite0 has no squeeze-and-excitation; this wraps it with one
parameter-free CBAM-style block after `blocks.10` (14x14, 112 channels), made of gates camserve
finds at load as a user's own modules:

- `attention.channel`: one weight per channel, the sigmoid of each channel's standardised mean;
- `attention.spatial`: one weight per position, the sigmoid of the standardised channel-mean map.

Serve it with `source = "factory:examples.attention_demo:lite0_with_attention"` (from the
repository root), `mean`/`std` 0.498/0.502 and crop 224, like the built-in model.
"""

from __future__ import annotations

import torch
from torch import nn

from camserve.server.models.builtin import efficientnet_lite0


def _standardised(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-6)


class ChannelGate(nn.Module):
    """(N, C, 1, 1): the sigmoid of each channel's mean, standardised over the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_standardised(x.mean((2, 3), keepdim=True), (1,)))


class SpatialGate(nn.Module):
    """(N, 1, H, W): the sigmoid of the channel-mean map, standardised over the positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2.0 * _standardised(x.mean(1, keepdim=True), (2, 3)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.channel = ChannelGate()
        self.spatial = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


class GatedLite0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = efficientnet_lite0()
        self.attention = Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.stem(x)
        for index, block in enumerate(net.blocks):
            x = block(x)
            if index == 10:
                x = self.attention(x)
        x = net.pool(net.head(x))
        return net.fc(net.dropout(torch.flatten(x, 1)))


def lite0_with_attention() -> nn.Module:
    return GatedLite0().eval()
