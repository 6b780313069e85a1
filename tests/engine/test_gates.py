"""Attention gates found at load (`camserve.server.engine.gates`): SE, CBAM and users' own."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from camserve.server.engine.gates import find_gates
from tests._support.servers import seeded_model


class ChannelGate(nn.Module):
    """A user's squeeze-and-excitation gate with a functional sigmoid: (N, C, 1, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class SpatialGate(nn.Module):
    """A user's CBAM-style spatial gate ending in an nn.Sigmoid child: (N, 1, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return self.act(self.conv(pooled))


class TinyCbam(nn.Module):
    """Conv, a channel gate, a spatial gate, and a sigmoid shared by two places (no gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.channel = ChannelGate(8)
        self.spatial = SpatialGate()
        self.shared = nn.Sigmoid()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x * self.channel(x)
        x = x * self.spatial(x)
        x = x * self.shared(self.pool(x)) * self.shared(self.pool(x))
        return self.head(self.pool(x).flatten(1))


def test_torchvision_squeeze_excitation_scale_activations() -> None:
    gates = find_gates(seeded_model("efficientnet_b0"), (224, 224))
    assert len(gates) == 16
    assert {(gate.kind, gate.module) for gate in gates} == {("channel", "Sigmoid")}
    assert gates[0].name == "features.1.0.block.1.scale_activation"
    assert gates[0].shape == (32,)
    mobile = find_gates(seeded_model("mobilenet_v3_small"), (224, 224))
    assert len(mobile) == 9
    assert {gate.module for gate in mobile} == {"Hardsigmoid"}


@pytest.mark.parametrize(
    ("attention", "expected"),
    [("se", {"channel": 8}), ("ese", {"channel": 8}), ("cbam", {"channel": 8, "spatial": 8})],
)
def test_timm_se_effective_se_and_cbam_gates(attention: str, expected: dict[str, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args={"attn_layer": attention}).eval()
    gates = find_gates(model, (96, 96))
    kinds = {kind: sum(gate.kind == kind for gate in gates) for kind in expected}
    assert kinds == expected
    spatial = [gate for gate in gates if gate.kind == "spatial"]
    if spatial:
        assert spatial[0].name == "layer1.0.se.spatial.gate"
        assert spatial[0].shape == (24, 24)


def test_users_own_gates_are_found_and_shared_or_library_modules_are_not() -> None:
    torch.manual_seed(0)
    gates = find_gates(TinyCbam().eval(), (32, 40))
    assert [(gate.name, gate.kind, gate.shape, gate.module) for gate in gates] == [
        ("channel", "channel", (8,), "ChannelGate"),
        ("spatial.act", "spatial", (32, 40), "Sigmoid"),  # the innermost module of the gate
    ]


def test_models_without_gates_have_none() -> None:
    assert find_gates(seeded_model("resnet18"), (64, 64)) == ()
    assert find_gates(seeded_model("vgg11"), (64, 64)) == ()


def test_the_attention_demo_model_has_one_channel_and_one_spatial_gate() -> None:
    from examples.attention_demo import lite0_with_attention

    gates = find_gates(lite0_with_attention(), (224, 224))
    assert [(gate.name, gate.kind, gate.shape) for gate in gates] == [
        ("attention.channel", "channel", (112,)),
        ("attention.spatial", "spatial", (14, 14)),
    ]
