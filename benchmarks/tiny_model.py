"""A classifier whose compute is negligible, for measuring everything around the engine.

`python benchmarks/ceiling.py` serves it through the `factory:` source (`tiny_model:tiny_cnn`,
with this folder on PYTHONPATH): a 224x224 image costs it about 1 MFLOP, against 1.8 GFLOP for a
resnet18, so the server's rate with it is what decoding, shaping, encoding and gRPC allow.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 1000  # ImageNet-sized logits, so predictions and top-k cost what they do for real


def tiny_cnn() -> nn.Module:
    """Two strided convolutions (to a 14x14 map at 224x224), pooling and a linear head; seeded
    random weights, the same in every process."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=4, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=4, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )
    finally:
        torch.random.set_rng_state(generator_state)
