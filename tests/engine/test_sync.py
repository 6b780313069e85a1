"""One host synchronisation per batch: the engine reads the device once, through
`camserve.server.engine.transfer.to_host`, per `explain_batch`, `predict` and `predict_tail`.

On the CPU nothing really synchronises, so the tests count calls to the transfer point and guard
against reads that would synchronise on a GPU: while a call runs, a `TorchFunctionMode` fails on
any `Tensor.item`, `.tolist`, `.cpu`, `.numpy`, `bool()`, `float()`, `int()` or index use of a
tensor until the transfer has happened. After it the guard stands down: from then on the engine
only reads the host copies the transfer returned, which on the CPU are the very same tensors, so
a guard cannot tell them apart from the device tensors they came from. tests/engine/test_gpu.py
covers the whole call on CUDA with `torch.cuda.set_sync_debug_mode("error")`.

The first call at a new input size runs the probe pass, which reads values on the host; it is
cached per size, so each test makes one call before counting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from pytorch_grad_cam import GradCAM
from torch import nn
from torch.overrides import TorchFunctionMode

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest, RowResult, transfer
from camserve.server.engine.transfer import _pack, _unpack
from tests._support.cams import assert_maps_match_reference, reference_cam

HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
    }
)


class HostReadGuard(TorchFunctionMode):
    """Fails on a host read of tensor values while `armed`."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.armed and func in HOST_READS:
            raise AssertionError(f"Tensor.{func.__name__} read the device before the transfer")
        return func(*args, **(kwargs or {}))


class Transfers:
    """Counts `to_host` calls and arms the guard until the first one of each counted call."""

    def __init__(self, guard: HostReadGuard) -> None:
        self.guard = guard
        self.to_host = 0
        self.to_device = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.to_host = self.to_device = 0
        with self.guard:
            self.guard.armed = True
            try:
                yield
            finally:
                self.guard.armed = False


@pytest.fixture
def transfers(monkeypatch: pytest.MonkeyPatch) -> Transfers:
    counter = Transfers(HostReadGuard())
    real_to_host, real_to_device = transfer.to_host, transfer.to_device

    def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        counter.to_host += 1
        counter.guard.armed = False  # the host copies may be read from here on
        return real_to_host(tensors)

    def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        counter.to_device += 1
        return real_to_device(tensors, device)

    monkeypatch.setattr(transfer, "to_host", to_host)
    monkeypatch.setattr(transfer, "to_device", to_device)
    return counter


def test_the_guard_catches_a_host_read(transfers: Transfers) -> None:
    with pytest.raises(AssertionError, match="tolist"), transfers.counting():
        torch.arange(3).tolist()
    with pytest.raises(AssertionError, match="__bool__"), transfers.counting():
        bool(torch.ones(()) > 0)
    with transfers.counting():
        transfer.to_host([torch.ones(2)])
        assert torch.ones(2).tolist() == [1.0, 1.0]  # after the transfer
    assert transfers.to_host == 1


@pytest.mark.parametrize(
    "shapes",
    [[(3,), (2, 5), ()], [(0,), (7,)], [(4, 3)]],
)
def test_packing_round_trips_every_dtype(shapes: list[tuple[int, ...]]) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors: list[torch.Tensor] = []
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16):
        for shape in shapes:
            tensors.append((torch.randn(shape, generator=generator) * 50).to(dtype))
    tensors.append(torch.randn(4, 6, generator=generator).T)  # not contiguous
    back = _unpack(_pack(tensors), tensors)
    for got, want in zip(back, tensors, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_to_host_leaves_cpu_tensors_as_they_are() -> None:
    tensors = [torch.ones(3), torch.zeros(2, dtype=torch.int64)]
    assert all(a is b for a, b in zip(transfer.to_host(tensors), tensors, strict=True))
    assert transfer.to_host([]) == []


def _explain_counted(
    engine: CamEngine, transfers: Transfers, batch: torch.Tensor, rows: list[RowRequest]
) -> list[RowResult]:
    engine.explain_batch(batch[:1], rows[:1])  # probe pass at this input size, cached
    with transfers.counting():
        results = engine.explain_batch(batch, rows)
    assert transfers.to_host == 1
    assert transfers.to_device == 1  # the class plan and row selections, one upload
    return results


def test_a_plain_batch_transfers_once(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    transfers: Transfers,
) -> None:
    size = (64, 64)
    batch = random_images(3, size, seed=41)
    engine = make_engine(seeded_resnet18, channels_last=False)
    results = _explain_counted(engine, transfers, batch, [RowRequest("layer4")] * 3)
    with torch.inference_mode():
        top1 = seeded_resnet18(batch).argmax(1).tolist()
    classes = [r.classes[0] for r in results]
    assert classes == top1
    expected = reference_cam(GradCAM, seeded_resnet18, "layer4", batch, classes)
    assert_maps_match_reference(results, "gradcam", classes, size, expected)


MIXED = [
    RowRequest("layer4", PASS_METHODS, classes=(5, 2)),
    RowRequest("layer3", ("gradcam", "eigencam", "layercam"), top_k=3, eigen_smooth=True),
    RowRequest("layer4", ("eigengradcam", "gradcampp"), top_k=2, keep_activations=True),
    RowRequest("layer3", (), classes=(1,), keep_activations=True),
    RowRequest("layer4", ("gradcam", "hirescam"), top_k=1, eigen_smooth=True),
]


def _assert_same(got: RowResult, want: RowResult) -> None:
    assert got.classes == want.classes
    assert got.layer == want.layer
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    assert set(got.maps) == set(want.maps)  # their order follows the batch's method groups
    for key, cam in got.maps.items():
        assert cam.device.type == "cpu"
        assert cam.dtype == torch.float32
        torch.testing.assert_close(cam, want.maps[key], rtol=1e-4, atol=1e-6, msg=str(key))
    assert len(got.retained) == len(want.retained)
    for a, b in zip(got.retained, want.retained, strict=True):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
        torch.testing.assert_close(a.activation, b.activation, rtol=1e-4, atol=1e-5)
        assert a.augmentation == b.augmentation


@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_rows_transfer_once_and_equal_each_row_alone(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    transfers: Transfers,
    channels_last: bool,
) -> None:
    """Explicit classes, top-k rows, every method (eigen ones included), two layers,
    eigen_smooth and keep_activations in one batch, read once; each row's result equals the same
    request explained alone, where no other row shares its method groups or class plan."""
    batch = random_images(len(MIXED), (64, 64), seed=42)
    engine = make_engine(seeded_resnet18, channels_last=channels_last)
    results = _explain_counted(engine, transfers, batch, MIXED)
    for i, row in enumerate(MIXED):
        alone = engine.explain_batch(batch[i : i + 1], [row])[0]
        _assert_same(results[i], alone)
        assert len(results[i].retained) == int(row.keep_activations)


def test_aug_smooth_rows_transfer_once(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    transfers: Transfers,
) -> None:
    rows = [
        RowRequest("head", ("gradcam", "eigencam"), top_k=2, aug_smooth=True),
        RowRequest("block", ("xgradcam",), classes=(3,), keep_activations=True),
        RowRequest("head", ("layercam",), classes=(4, 1), aug_smooth=True, keep_activations=True),
    ]
    batch = random_images(len(rows), (32, 32), seed=43)
    engine = make_engine(seeded_tiny)
    results = _explain_counted(engine, transfers, batch, rows)
    assert len(results[2].retained) == 6
    for i, row in enumerate(rows):
        _assert_same(results[i], engine.explain_batch(batch[i : i + 1], [row])[0])


def test_predict_and_predict_tail_transfer_once(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    transfers: Transfers,
) -> None:
    batch = random_images(2, (64, 64), seed=44)
    engine = make_engine(seeded_resnet18)
    kept = engine.explain_batch(batch, [RowRequest("layer4", (), keep_activations=True)] * 2)
    activations = torch.stack([r.retained[0].activation for r in kept])
    engine.predict_tail("layer4", activations.clone(), batch)  # builds and checks the split
    with transfers.counting():
        logits = engine.predict(batch)
    assert transfers.to_host == 1
    with transfers.counting():
        tail = engine.predict_tail("layer4", activations.clone(), batch)
    assert transfers.to_host == 1
    assert logits.dtype == tail.dtype == torch.float32
    torch.testing.assert_close(tail, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack([r.logits for r in kept]), logits)
