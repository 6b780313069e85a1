"""Reduced precision by casting the frozen weights once: bfloat16 on the CPU against float32.

The tolerances come from measurements on these cases (a seeded resnet18 with random weights,
whose maps of a non-top class are faint: the hardest case). After min-max normalisation at
input size, the worst bfloat16 map (HiResCAM of class 3 at layer3) correlates 0.993 with its
float32 counterpart, mean absolute difference 0.021, largest 0.11; every top-k map correlates
above 0.9999 (mean difference <= 0.004). Logits differ by at most 0.018, probabilities by 3e-4,
and the gradient-free maps of the tiny net by a mean 0.005. Thresholds leave about twice that.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import (
    PASS_METHODS,
    CamEngine,
    EngineError,
    RowRequest,
    explain_all,
    normalise,
    to_input,
)
from camserve.server.engine.eigen import first_component

SIZE = (96, 96)
# The eigen methods are compared in test_eigen_maps_agree_up_to_sign: rounding may flip the
# arbitrary sign of a projection (see camserve.server.engine.eigen).
SUMS = tuple(m for m in PASS_METHODS if not m.startswith("eigen"))
ROWS = [
    RowRequest("layer4", PASS_METHODS, top_k=2),
    RowRequest("layer3", SUMS, classes=(3,)),
    RowRequest("layer4", ("gradcam", "hirescam"), classes=(7, 9), eigen_smooth=True),
]


def _flat(cam: torch.Tensor) -> torch.Tensor:
    return normalise(to_input(cam, SIZE)).flatten()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(len(ROWS), 3, *SIZE, generator=torch.Generator().manual_seed(51))


def test_bfloat16_casts_the_weights_once(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine], batch: torch.Tensor
) -> None:
    engine = make_engine(seeded_resnet18, precision="bfloat16")
    floating = [
        t for t in (*engine.model.parameters(), *engine.model.buffers()) if t.is_floating_point()
    ]
    assert floating
    assert all(t.dtype == torch.bfloat16 for t in floating)
    before = [t.data_ptr() for t in floating]
    engine.explain_batch(batch[:1], ROWS[:1])
    logits = engine.predict(batch[:1])
    assert [t.data_ptr() for t in floating] == before  # no per-call copies of the weights
    assert all(t.dtype == torch.bfloat16 for t in floating)
    assert logits.dtype == torch.float32
    assert all(p.grad is None for p in engine.model.parameters())


def test_bfloat16_maps_and_predictions_agree_with_float32(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine], batch: torch.Tensor
) -> None:
    full = make_engine(seeded_resnet18).explain_batch(batch, ROWS)
    half_engine = make_engine(seeded_resnet18, precision="bfloat16")
    half = half_engine.explain_batch(batch, ROWS)
    for row, got, want in zip(ROWS, half, full, strict=True):
        assert got.logits.dtype == torch.float32
        assert got.classes[0] == want.classes[0]  # top-1 (or the explicit class) agrees
        if row.classes:
            assert got.classes == want.classes
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0.05)
        torch.testing.assert_close(got.probabilities, want.probabilities, rtol=0, atol=1e-3)
        for key, cam in got.maps.items():
            if key[0].startswith("eigen") or key not in want.maps:
                continue
            assert cam.dtype == torch.float32
            assert cam.device.type == "cpu"
            a, b = _flat(cam), _flat(want.maps[key])
            assert _correlation(a, b) > 0.98, key
            assert float((a - b).abs().mean()) < 0.05, key
    full_logits = make_engine(seeded_resnet18).predict(batch)
    half_logits = half_engine.predict(batch)
    assert half_logits.dtype == torch.float32
    assert torch.equal(half_logits.argmax(1), full_logits.argmax(1))


def test_eigen_maps_agree_up_to_sign(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine], batch: torch.Tensor
) -> None:
    """A projection's sign is arbitrary, and rounding may flip it, which after the ReLU gives
    the map of the complement: the bfloat16 map must match the float32 projection's ReLU, or
    that of its negation."""
    rows = [RowRequest("layer4", ("eigencam",), classes=(1,), keep_activations=True)] * 2
    full = make_engine(seeded_resnet18).explain_batch(batch[:2], rows)
    half = make_engine(seeded_resnet18, precision="bfloat16").explain_batch(batch[:2], rows)
    for got, want in zip(half, full, strict=True):
        activation = want.retained[0].activation  # (C, h, w) float32
        projection = first_component(activation.flatten(1).T).reshape(activation.shape[1:])
        torch.testing.assert_close(projection.clamp(min=0), want.maps[("eigencam", 1)])
        ours = _flat(got.maps[("eigencam", 1)])
        signs = [_correlation(ours, _flat((sign * projection).clamp(min=0))) for sign in (1, -1)]
        assert max(signs) > 0.98, signs


def test_bfloat16_gradient_free_methods_and_tail(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """The retained activations are bfloat16; the follow-up rows and the tail take them."""
    images = random_images(2, (32, 32), seed=52)
    rows = [RowRequest("head", ("ablationcam", "scorecam", "gradcam"), classes=(4,))] * 2
    full = explain_all(make_engine(seeded_tiny), images, rows, chunk_rows=16)
    engine = make_engine(seeded_tiny, precision="bfloat16")
    half = explain_all(engine, images, rows, chunk_rows=16)
    for got, want in zip(half, full, strict=True):
        for key in want.maps:
            a, b = _flat(got.maps[key]), _flat(want.maps[key])
            assert _correlation(a, b) > 0.99, key
            assert float((a - b).abs().mean()) < 0.03, key
    assert engine.tail_fraction("head", (32, 32)) < 1.0


def test_float16_needs_cuda(seeded_tiny: nn.Module, make_engine: Callable[..., CamEngine]) -> None:
    with pytest.raises(EngineError, match="'float16' needs a CUDA device.*'bfloat16'"):
        make_engine(seeded_tiny, precision="float16")
