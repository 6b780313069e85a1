"""Rows with different new methods and options share a batch and get what they would alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, RowRequest, RowResult

ROWS = [
    RowRequest("layer4", ("eigencam", "gradcam"), top_k=2),
    RowRequest("layer3", ("eigengradcam", "gradcamelementwise"), classes=(3, 1), eigen_smooth=True),
    RowRequest("layer4", ("gradcam", "hirescam"), classes=(5,), eigen_smooth=True),
    RowRequest("layer3", ("layercam", "eigencam"), aug_smooth=True, eigen_smooth=True),
    RowRequest("layer4", (), classes=(2,), keep_activations=True),
    RowRequest("layer4", ("gradcampp",), classes=(2,), keep_activations=True, aug_smooth=True),
]


def _assert_same(got: RowResult, expected: RowResult) -> None:
    assert got.classes == expected.classes
    assert got.maps.keys() == expected.maps.keys()
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for key, value in expected.maps.items():
        scale = max(float(value.abs().max()), 1.0)
        torch.testing.assert_close(got.maps[key], value, rtol=1e-4, atol=1e-5 * scale)
    assert len(got.retained) == len(expected.retained)
    for a, b in zip(got.retained, expected.retained, strict=True):
        assert a.augmentation == b.augmentation
        torch.testing.assert_close(a.activation, b.activation, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_mixed_options_batch_equals_each_row_alone(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(len(ROWS), (64, 64), seed=8)
    engine = make_engine(seeded_resnet18)
    together = engine.explain_batch(batch, ROWS)
    for i, row in enumerate(ROWS):
        _assert_same(together[i], engine.explain_batch(batch[i : i + 1], [row])[0])
    assert together[4].maps == {}
    assert len(together[4].retained) == 1
    assert together[4].retained[0].augmentation is None
    assert len(together[5].retained) == 6


def test_a_batch_without_gradient_methods_runs_no_backward(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = random_images(2, (64, 64), seed=9)
    engine = make_engine(seeded_resnet18)
    rows = [
        RowRequest("layer4", ("eigencam",), top_k=2),
        RowRequest("layer3", (), keep_activations=True),
    ]
    with_gradients = engine.explain_batch(batch, [*rows[:1], RowRequest("layer3", ("gradcam",))])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no backward expected")

    monkeypatch.setattr(engine._pass, "_gradients", refuse)
    results = engine.explain_batch(batch, rows)
    for key, value in with_gradients[0].maps.items():
        torch.testing.assert_close(results[0].maps[key], value, rtol=1e-4, atol=1e-5)
    assert results[1].retained[0].activation.shape == (256, 4, 4)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (RowRequest("layer4", ()), r"non-empty tuple .* \(empty only with keep_activations"),
        (RowRequest("layer4", ("scorecam",)), "'scorecam' needs forward-only rows"),
        (RowRequest("layer4", eigen_smooth=1), r"eigen_smooth must be True or False"),  # type: ignore[arg-type]
        (RowRequest("layer4", aug_smooth="yes"), r"aug_smooth must be True or False"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_name_the_argument(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    row: RowRequest,
    match: str,
) -> None:
    with pytest.raises(EngineError, match=match):
        make_engine(seeded_tiny).explain_batch(torch.zeros(1, 3, 32, 32), [row])
