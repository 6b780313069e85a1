"""Valid target layers and the default-layer rule."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, LayerError, LayerSpec


def test_resnet18_layers_in_forward_order(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_resnet18)
    specs = engine.layers((224, 224))
    names = [spec.name for spec in specs]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]  # the stem's relu runs once
    assert names.index("layer3") < names.index("layer4.0") < names.index("layer4")
    assert names[-2:] == ["layer4", "avgpool"]
    assert LayerSpec("layer4", (512, 7, 7)) in specs
    assert LayerSpec("layer2.0.downsample", (128, 28, 28)) in specs
    # BasicBlock calls its relu twice: never a valid target.
    assert not [name for name in names if name.startswith("layer") and name.endswith(".relu")]
    assert "fc" not in names  # 2-D output
    assert engine.default_layer((224, 224)) == "layer4"
    assert engine.num_classes((224, 224)) == 1000


def test_shapes_follow_the_input_size(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_resnet18)
    shapes = {spec.name: spec.shape for spec in engine.layers((96, 160))}
    assert shapes["layer4"] == (512, 3, 5)
    assert shapes["conv1"] == (64, 48, 80)


@pytest.mark.parametrize(
    ("model", "size", "expected"),
    [
        ("seeded_mobilenet", (128, 128), "features"),
        ("lite0", (224, 224), "head"),
        ("lite0", (224, 448), "head"),
        # torchvision's VGG ends with AdaptiveAvgPool2d((7, 7)): a spatial output that runs once
        # and is followed only by the classifier, so the rule picks it.
        ("seeded_vgg11", (64, 64), "avgpool"),
    ],
    indirect=["model"],
)
def test_default_layer(
    make_engine: Callable[..., CamEngine],
    model: nn.Module,
    size: tuple[int, int],
    expected: str,
) -> None:
    engine = make_engine(model)
    assert engine.default_layer(size) == expected


def test_lite0_head_shape_on_a_wide_input(
    lite0: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    shapes = {spec.name: spec.shape for spec in make_engine(lite0).layers((224, 448))}
    assert shapes["head"] == (1280, 7, 14)
    assert "head.2" in shapes
    assert "blocks.15" in shapes


def test_shared_head_activation_has_no_default(
    lite0_original: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(lite0_original)
    with pytest.raises(LayerError) as caught:
        engine.default_layer((224, 224))
    message = str(caught.value)
    assert "module '_swish', which runs 2 times per forward pass" in message
    assert "Pass a layer explicitly" in message
    assert "_swish" not in {spec.name for spec in engine.layers((224, 224))}


def test_models_without_spatial_layers_have_no_default() -> None:
    engine = CamEngine(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)))
    with pytest.raises(LayerError, match="no module of this model outputs a spatial"):
        engine.default_layer((4, 4))
    assert engine.layers((4, 4)) == []
    assert engine.num_classes((4, 4)) == 2


def test_input_size_is_checked(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_resnet18)
    with pytest.raises(EngineError, match="input_size must be"):
        engine.layers((0, 224))
    with pytest.raises(EngineError, match="input_size must be"):
        engine.default_layer((224,))  # type: ignore[arg-type]
    small = CamEngine(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(EngineError, match="cannot run on a 3x2x2 image"):
        small.layers((2, 2))


def test_probe_runs_once_per_input_size(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_resnet18)
    calls = []
    engine.model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    engine.layers((64, 64))
    engine.default_layer((64, 64))
    engine.num_classes((64, 64))
    assert len(calls) == 2  # the probe, and once per engine the batched-backward check
    assert engine.batched_grads is True
    engine.layers((96, 96))
    assert len(calls) == 3
    assert isinstance(engine.layers((64, 64))[0].shape[0], int)
    del calls[:]
    engine.predict(torch.zeros(1, 3, 64, 64))
    assert len(calls) == 1
