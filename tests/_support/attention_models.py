"""Models with attention gates for the server tests, served through factory sources."""

from __future__ import annotations

import timm
import torch
from torch import nn

CBAM_SOURCE = "factory:tests._support.attention_models:cbam_resnet"


def cbam_resnet() -> nn.Module:
    """A seeded timm ResNet-18 with CBAM blocks: 8 channel and 8 spatial gates, 5 classes."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", block_args={"attn_layer": "cbam"}, num_classes=5).eval()
