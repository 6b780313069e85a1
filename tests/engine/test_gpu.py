"""CUDA: float32 and bfloat16 autocast, contiguous and channels_last, against the CPU engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import (
    METHODS,
    CamEngine,
    RowRequest,
    explain_all,
    normalise,
    to_input,
)
from camserve.server.engine.eigen import first_component

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# The eigen methods are left out of the CPU comparison: TF32 and bfloat16 rounding may flip the
# arbitrary sign of a projection (see camserve.server.engine.eigen); test_cuda_new_methods
# covers them on the device.
SUMS = tuple(m for m in METHODS if not m.startswith("eigen"))
ROWS = [
    RowRequest("layer4", SUMS, top_k=3),
    RowRequest("layer3", ("gradcam", "layercam"), classes=(5,)),
    RowRequest("layer4", ("gradcam",), classes=(1, 2)),
]


def _normalised(result_maps: dict[tuple[str, int], torch.Tensor]) -> dict[object, torch.Tensor]:
    return {key: normalise(to_input(cam, (160, 160))) for key, cam in result_maps.items()}


@pytest.mark.parametrize(
    ("precision", "channels_last", "map_tol", "prob_tol"),
    [
        # cuDNN convolutions may use TF32 in float32, hence a tolerance well above 1e-6.
        ("float32", False, 1e-2, 1e-4),
        ("float32", True, 1e-2, 1e-4),
        ("bfloat16", True, 0.1, 2e-3),
        ("bfloat16", None, 0.1, 2e-3),  # the engine's default layout under autocast
    ],
)
def test_cuda_matches_the_cpu_engine(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    precision: str,
    channels_last: bool | None,
    map_tol: float,
    prob_tol: float,
) -> None:
    batch = random_images(3, (160, 160), seed=31)
    cpu = make_engine(seeded_resnet18).explain_batch(batch, ROWS)
    cuda_engine = make_engine(
        seeded_resnet18, device="cuda", precision=precision, channels_last=channels_last
    )
    gpu = cuda_engine.explain_batch(batch.cuda(), ROWS)
    for row, got, want in zip(ROWS, gpu, cpu, strict=True):
        assert got.logits.device.type == "cpu"
        assert got.logits.dtype == torch.float32
        if row.classes:
            assert got.classes == want.classes
        else:  # low precision may reorder near-tied classes of a top-k row
            assert len(set(got.classes) & set(want.classes)) >= len(want.classes) - 1
        torch.testing.assert_close(got.probabilities, want.probabilities, atol=prob_tol, rtol=0)
        got_maps, want_maps = _normalised(got.maps), _normalised(want.maps)
        assert set(got_maps) & set(want_maps)
        for key in set(got_maps) & set(want_maps):
            assert got.maps[key].device.type == "cpu"
            assert got.maps[key].dtype == torch.float32
            assert float((got_maps[key] - want_maps[key]).abs().mean()) < map_tol, key
    assert all(p.grad is None for p in cuda_engine.model.parameters())


def test_cuda_peak_memory_stays_near_a_forward_pass(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = make_engine(seeded_resnet18, device="cuda")
    batch = random_images(32, (224, 224), seed=32).cuda()
    engine.predict(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine.predict(batch)
    forward_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine.explain_batch(batch, [RowRequest("layer4", METHODS)] * 32)
    explain_peak = torch.cuda.max_memory_allocated() - base
    assert explain_peak <= 1.5 * forward_peak, (explain_peak, forward_peak)


def test_cuda_new_methods(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """The projection runs on the CPU whatever the device; the gradient-free rows, the tail and
    aug_smooth run on the device and agree with the CPU engine."""
    matrices = torch.randn(3, 49, 512, generator=torch.Generator().manual_seed(0))
    on_gpu = first_component(matrices.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), first_component(matrices), rtol=0, atol=0)

    batch = random_images(2, (64, 64), seed=33)
    rows = [
        RowRequest("layer4", ("ablationcam", "eigencam"), classes=(3,), aug_smooth=True),
        RowRequest("layer3", ("scorecam", "gradcam"), classes=(5,), eigen_smooth=True),
    ]
    cpu = explain_all(make_engine(seeded_resnet18), batch, rows, chunk_rows=256)
    engine = make_engine(seeded_resnet18, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = explain_all(engine, batch.cuda(), rows, chunk_rows=256)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    for got, want in zip(gpu, cpu, strict=True):
        for key in ("ablationcam", 3), ("scorecam", 5):
            if key in want.maps:
                a = normalise(to_input(got.maps[key], (64, 64)))
                b = normalise(to_input(want.maps[key], (64, 64)))
                assert float((a - b).abs().mean()) < 1e-2, key
    assert engine.tail_fraction("layer4", (64, 64)) < 0.05
