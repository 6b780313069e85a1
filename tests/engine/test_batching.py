"""A batch mixing layers, methods and classes gives each row what it would get alone."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest, RowResult

MIXED_ROWS = [
    RowRequest("layer4", ("gradcam",), classes=(1,)),
    RowRequest("layer3", ("gradcampp", "hirescam"), top_k=3),
    RowRequest("layer4.0", PASS_METHODS, classes=(7, 2)),
    RowRequest("layer4", ("layercam", "xgradcam")),
]


def assert_same_row(got: RowResult, expected: RowResult) -> None:
    assert got.classes == expected.classes
    assert got.layer == expected.layer
    assert got.maps.keys() == expected.maps.keys()
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)
    for key, expected_map in expected.maps.items():
        scale = max(float(expected_map.abs().max()), 1.0)
        torch.testing.assert_close(got.maps[key], expected_map, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture
def resnet_engine(seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]) -> CamEngine:
    return make_engine(seeded_resnet18)


def test_mixed_batch_equals_each_image_alone(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(4, (160, 160), seed=3)
    together = resnet_engine.explain_batch(batch, MIXED_ROWS)
    for i, row in enumerate(MIXED_ROWS):
        alone = resnet_engine.explain_batch(batch[i : i + 1], [row])[0]
        assert_same_row(together[i], alone)
    # Only what was asked: row 0 gets one map, row 1 two methods x three classes.
    assert set(together[0].maps) == {("gradcam", 1)}
    assert len(together[1].maps) == 6
    assert {method for method, _ in together[1].maps} == {"gradcampp", "hirescam"}


def test_a_row_does_not_depend_on_its_neighbours(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    first = random_images(4, (160, 160), seed=3)
    second = torch.cat([first[2:3], random_images(2, (160, 160), seed=4), first[:1]])
    rows = [MIXED_ROWS[2], MIXED_ROWS[1], MIXED_ROWS[3], MIXED_ROWS[0]]
    a = resnet_engine.explain_batch(first, MIXED_ROWS)
    b = resnet_engine.explain_batch(second, rows)
    assert_same_row(b[0], a[2])
    assert_same_row(b[3], a[0])


def test_top_k_row_explains_the_highest_scores_in_order(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(2, (128, 128), seed=5)
    results = resnet_engine.explain_batch(
        batch, [RowRequest("layer4", top_k=5), RowRequest("layer4", classes=(9,))]
    )
    top5 = resnet_engine.predict(batch).topk(5, dim=1).indices
    assert results[0].classes == tuple(top5[0].tolist())
    assert results[1].classes == (9,)
    for result in results:
        assert result.logits.dtype == torch.float32
        assert result.logits.device.type == "cpu"
        torch.testing.assert_close(result.probabilities, torch.softmax(result.logits, 0))
        for cam in result.maps.values():
            assert cam.shape == (4, 4)
            assert cam.dtype == torch.float32
            assert cam.device.type == "cpu"
            assert not cam.requires_grad
            assert float(cam.min()) >= 0.0
    # K = 5 classes for one row: each map equals explaining that class on its own.
    for class_index in results[0].classes:
        alone = resnet_engine.explain_batch(
            batch[:1], [RowRequest("layer4", classes=(class_index,))]
        )
        torch.testing.assert_close(
            results[0].maps[("gradcam", class_index)], alone[0].maps[("gradcam", class_index)]
        )


class _NumpyDouble(torch.autograd.Function):
    """A custom op whose backward leaves torch (as some extensions do), so vmap cannot batch it."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(grad.detach().cpu().numpy() * 2))


class _UnbatchableHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _NumpyDouble.apply(torch.relu(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_falls_back_to_one_backward_per_class_when_vmap_fails(
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = CamEngine(_UnbatchableHead())
    batch = random_images(2, (16, 16), seed=1)
    rows = [
        RowRequest("conv", PASS_METHODS, top_k=3),
        RowRequest("conv", PASS_METHODS, classes=(5, 0)),
    ]
    together = engine.explain_batch(batch, rows)
    for i, row in enumerate(together):
        for class_index in row.classes:
            alone = engine.explain_batch(
                batch[i : i + 1], [RowRequest("conv", PASS_METHODS, (class_index,))]
            )
            for method in PASS_METHODS:
                torch.testing.assert_close(
                    row.maps[(method, class_index)], alone[0].maps[(method, class_index)]
                )
    assert engine.batched_grads is False  # the probe at load found vmap cannot batch it
    again = engine.explain_batch(batch, rows)
    assert_same_row(again[0], together[0])


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_inside_the_callers_no_grad_or_inference_mode(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor], context: str
) -> None:
    batch = random_images(1, (128, 128), seed=6)
    expected = resnet_engine.explain_batch(batch, [RowRequest("layer4", PASS_METHODS)])[0]
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        inner = batch.clone()  # an inference tensor under inference_mode
        got = resnet_engine.explain_batch(inner, [RowRequest("layer4", PASS_METHODS)])[0]
    assert_same_row(got, expected)


def test_accepts_float64_and_non_contiguous_batches(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(2, (128, 128), seed=8)
    expected = resnet_engine.explain_batch(batch, [RowRequest("layer4")] * 2)
    flipped = batch.double().permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    got = resnet_engine.explain_batch(flipped, [RowRequest("layer4")] * 2)
    for a, b in zip(got, expected, strict=True):
        assert_same_row(a, b)


class _FailsBatchedOnce(torch.autograd.Function):
    """The identity, whose backward fails once when armed: a transient error in a backward."""

    armed = False

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        if _FailsBatchedOnce.armed:
            _FailsBatchedOnce.armed = False
            raise RuntimeError("a transient backward failure")
        return grad


class _TransientHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _FailsBatchedOnce.apply(torch.relu(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_transient_failure_of_the_batched_backward_keeps_it_for_later_batches(
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = CamEngine(_TransientHead())
    batch = random_images(2, (16, 16), seed=4)
    rows = [RowRequest("conv", PASS_METHODS, top_k=3)] * 2
    assert engine.layers((16, 16))
    assert engine.batched_grads is True  # probed once, at load
    expected = engine.explain_batch(batch, rows)
    _FailsBatchedOnce.armed = True
    survived = engine.explain_batch(batch, rows)  # this batch takes one backward per class
    assert not _FailsBatchedOnce.armed
    assert engine.batched_grads is True
    for got, want in zip(survived, expected, strict=True):
        assert_same_row(got, want)
