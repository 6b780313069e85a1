"""channels_last by default on the CPU, the same maps either way, and the fallback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest


class _ViewsFeatureMaps(nn.Module):
    """Flattens a feature map with `.view`, which channels_last tensors cannot do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("broken for a reason that has nothing to do with memory format")
        features = self.conv(x)
        n, c, h, w = features.shape
        flat = features.view(n, c * h * w)  # needs NCHW-contiguous memory
        return self.fc(flat.view(n, c, h * w).mean(dim=2))


def test_cpu_default_is_channels_last_with_equal_maps(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    fast = make_engine(seeded_resnet18)
    plain = make_engine(seeded_resnet18, channels_last=False)
    assert fast.channels_last
    assert not plain.channels_last
    batch = random_images(2, (128, 128), seed=9)
    rows = [RowRequest("layer3", PASS_METHODS, top_k=2), RowRequest("layer4", PASS_METHODS)]
    for a, b in zip(fast.explain_batch(batch, rows), plain.explain_batch(batch, rows), strict=True):
        assert a.classes == b.classes
        for key, cam in b.maps.items():
            scale = max(float(cam.abs().max()), 1.0)
            torch.testing.assert_close(a.maps[key], cam, rtol=1e-4, atol=1e-5 * scale)


def test_default_falls_back_to_contiguous_for_models_that_need_it(
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(2, (8, 8))
    engine = CamEngine(_ViewsFeatureMaps())
    assert engine.channels_last
    result = engine.explain_batch(batch, [RowRequest("conv", top_k=2)] * 2)
    assert not engine.channels_last
    assert len(result[0].maps) == 2
    assert engine.predict(batch).shape == (2, 4)

    forced = CamEngine(_ViewsFeatureMaps(), channels_last=True)
    with pytest.raises(RuntimeError, match="view"):
        forced.predict(batch)
    assert forced.channels_last


def test_a_failure_unrelated_to_the_format_keeps_channels_last(
    random_images: Callable[..., torch.Tensor],
) -> None:
    broken = _ViewsFeatureMaps()
    broken.broken = True
    engine = CamEngine(broken)
    with pytest.raises(RuntimeError, match="nothing to do with memory format"):
        engine.predict(random_images(1, (8, 8)))
    assert engine.channels_last


class _FailsOnDemand(nn.Module):
    """A convolution that raises what it is told to on its next calls with channels_last input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.failures: list[Exception] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failures and x.is_contiguous(memory_format=torch.channels_last):
            raise self.failures.pop(0)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_running_out_of_memory_never_switches_the_memory_format(
    random_images: Callable[..., torch.Tensor],
) -> None:
    model = _FailsOnDemand()
    engine = CamEngine(model)
    batch = random_images(1, (8, 8))
    model.failures.append(torch.OutOfMemoryError("out of memory (raised by the test)"))
    with pytest.raises(torch.OutOfMemoryError):
        engine.predict(batch)  # the first call: out of memory says nothing about the format
    assert engine.channels_last
    assert engine.predict(batch).shape == (1, 4)  # the format is decided by this call
    assert engine.channels_last


def test_the_format_is_decided_by_the_first_call_and_later_failures_are_raised(
    random_images: Callable[..., torch.Tensor],
) -> None:
    model = _FailsOnDemand()
    engine = CamEngine(model)
    assert engine.layers((8, 8))  # the probe at load: channels_last works
    model.failures.append(RuntimeError("a transient failure"))
    with pytest.raises(RuntimeError, match="a transient failure"):
        engine.explain_batch(random_images(1, (8, 8)), [RowRequest("conv")])
    assert engine.channels_last  # not switched to contiguous by a later failure
