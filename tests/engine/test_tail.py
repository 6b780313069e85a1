"""The tail after a target layer: torch.fx split, equal to the full model, with a fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, LayerError
from camserve.server.engine.tail import TailUnavailable, recorded_output, split_after


def _layer_output(model: nn.Module, layer: str, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), recorded_output(model.get_submodule(layer)) as seen:
        model(batch)
    return seen[0]


@pytest.mark.parametrize(
    ("model", "layer", "size"),
    [
        ("seeded_resnet18", "layer4", (64, 64)),
        ("seeded_resnet18", "layer3", (64, 64)),
        ("seeded_mobilenet", "features.9", (96, 96)),
        ("seeded_tiny", "block", (32, 32)),
    ],
    indirect=["model"],
)
def test_split_tail_equals_the_full_model(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    layer: str,
    size: tuple[int, int],
) -> None:
    batch = random_images(3, size, seed=5)
    tail = split_after(model, layer)
    activations = _layer_output(model, layer, batch)
    with torch.inference_mode():
        expected = model(batch)
        torch.testing.assert_close(tail(activations.clone()), expected, rtol=1e-5, atol=1e-5)
    engine = make_engine(model)
    torch.testing.assert_close(
        engine.predict_tail(layer, activations, batch), expected, rtol=1e-4, atol=1e-4
    )
    assert 0 < engine.tail_fraction(layer, size) < 1


def test_a_tail_shares_the_models_parameters(seeded_tiny: nn.Module) -> None:
    tail = split_after(seeded_tiny, "act")
    assert tail.get_submodule("fc").weight is seeded_tiny.fc.weight
    assert not any(isinstance(m, nn.Conv2d) for m in tail.modules())  # nothing before the layer


def test_untraceable_model_falls_back_to_the_full_forward_and_logs_once(
    seeded_tiny: nn.Module,
    seeded_branchy: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    caplog: pytest.LogCaptureFixture,
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    with pytest.raises(TailUnavailable, match="torch.fx cannot trace"):
        split_after(seeded_branchy, "act")
    batch = random_images(2, (32, 32), seed=6)
    activations = _layer_output(seeded_tiny, "act", batch)
    ablated = activations.clone()
    ablated[:, 3] = 0  # the tail must see these activations, not the layer's own output
    engine = make_engine(seeded_branchy)
    traced = make_engine(seeded_tiny)
    with caplog.at_level(logging.WARNING, logger="camserve.engine"):
        got = engine.predict_tail("act", ablated.clone(), batch)
        engine.predict_tail("act", ablated.clone(), batch)
        engine.predict_tail("block", _layer_output(seeded_tiny, "block", batch), batch)
    torch.testing.assert_close(got, traced.predict_tail("act", ablated.clone(), batch))
    assert not torch.allclose(got, engine.predict(batch))
    warnings = [r for r in caplog.records if r.name == "camserve.engine"]
    assert len(warnings) == 1
    assert "'act'" in warnings[0].getMessage()
    assert "torch.fx cannot trace" in warnings[0].getMessage()
    assert engine.tail_fraction("act", (32, 32)) == 1.0
    assert_no_hooks(engine.model)


def test_a_skip_connection_around_the_layer_uses_the_fallback(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """block.bn2's output is added to the block's input: the tail also needs that input."""
    with pytest.raises(TailUnavailable, match="at 'add': a skip connection"):
        split_after(seeded_tiny, "block.bn2")
    batch = random_images(2, (32, 32), seed=7)
    activations = _layer_output(seeded_tiny, "block.bn2", batch)
    engine = make_engine(seeded_tiny)
    with torch.inference_mode():
        expected = seeded_tiny(batch)
    # One image per row given by index: rows 0 and 2 come from image 1, row 1 from image 0.
    rows = activations[[1, 0, 1]]
    got = engine.predict_tail("block.bn2", rows, batch, image_index=[1, 0, 1])
    torch.testing.assert_close(got, expected[[1, 0, 1]], rtol=1e-5, atol=1e-5)


def test_bad_tail_calls_name_the_argument(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = make_engine(seeded_tiny)
    batch = random_images(2, (32, 32))
    activations = torch.zeros(3, 24, 8, 8)
    with pytest.raises(EngineError, match="images holds 2 images for 3 rows"):
        engine.predict_tail("act", activations, batch)
    with pytest.raises(EngineError, match="image_index has 2 entries for 3 rows"):
        engine.predict_tail("act", activations, batch, image_index=[0, 1])
    with pytest.raises(EngineError, match=r"image_index entries must be ints in 0\.\.1"):
        engine.predict_tail("act", activations, batch, image_index=[0, 1, 2])
    with pytest.raises(EngineError, match=r"activations must be \(R, C, h, w\)"):
        engine.predict_tail("act", torch.zeros(24, 8, 8), batch[:1])
    with pytest.raises(LayerError, match="'nope' is not a module"):
        engine.predict_tail("nope", activations, batch[:1])
    with pytest.raises(LayerError, match="'fc' is not a target layer"):
        engine.predict_tail("fc", activations, batch[:1])
    with pytest.raises(EngineError, match=r"layer 'act' outputs \(24, 8, 8\) at 32x32"):
        engine.predict_tail("act", torch.zeros(1, 8, 8, 8), batch[:1])
