"""CUDA: float32, and bfloat16 and float16 weights cast once, contiguous and channels_last,
against the CPU engine; and one host synchronisation per batch, checked by CUDA's sync debug
mode (the engine's single transfer, `camserve.server.engine.transfer.to_host`, is exempt)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import (
    PASS_METHODS,
    CamEngine,
    RowRequest,
    explain_all,
    normalise,
    to_input,
)
from camserve.server.engine.eigen import first_component

pytestmark = pytest.mark.gpu

# The eigen methods are left out of the CPU comparison: TF32 and bfloat16 rounding may flip the
# arbitrary sign of a projection (see camserve.server.engine.eigen); test_cuda_new_methods
# covers them on the device.
SUMS = tuple(m for m in PASS_METHODS if not m.startswith("eigen"))
ROWS = [
    RowRequest("layer4", SUMS, top_k=3),
    RowRequest("layer3", ("gradcam", "layercam"), classes=(5,)),
    RowRequest("layer4", ("gradcam",), classes=(1, 2)),
]


def _normalised(
    result_maps: dict[tuple[str, int], torch.Tensor],
) -> dict[tuple[str, int], torch.Tensor]:
    return {key: normalise(to_input(cam, (160, 160))) for key, cam in result_maps.items()}


@pytest.mark.parametrize(
    ("precision", "channels_last", "map_tol", "prob_tol"),
    [
        # cuDNN convolutions may use TF32 in float32, hence a tolerance well above 1e-6.
        ("float32", False, 1e-2, 1e-4),
        ("float32", True, 1e-2, 1e-4),
        ("bfloat16", True, 0.1, 2e-3),
        ("bfloat16", None, 0.1, 2e-3),  # the engine's default layout in reduced precision
        ("float16", None, 0.1, 2e-3),
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
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert all(p.dtype == dtype[precision] for p in cuda_engine.model.parameters())
    assert not torch.backends.cudnn.benchmark  # batch sizes vary: no re-tuning per size


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
    engine.explain_batch(batch, [RowRequest("layer4", PASS_METHODS)] * 32)
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


SYNC_ROWS = [
    RowRequest("layer4", PASS_METHODS, classes=(5, 2)),
    RowRequest("layer3", ("gradcam", "eigencam", "layercam"), top_k=3, eigen_smooth=True),
    RowRequest("layer4", ("eigengradcam", "gradcampp"), top_k=2, keep_activations=True),
    RowRequest("layer3", (), classes=(1,), keep_activations=True),
    RowRequest("layer4", ("gradcam", "hirescam"), top_k=1, aug_smooth=True),
]


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cuda-batch", "cpu-batch"])
def test_cuda_synchronises_once_per_call(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    on_device: bool,
) -> None:
    """Any synchronising call but the transfer raises under sync debug mode "error"; the first
    call at an input size (probe pass, cuDNN's algorithm search) is left out."""
    from camserve.server.engine import transfer

    batch = random_images(len(SYNC_ROWS), (96, 96), seed=34)
    batch = batch.cuda() if on_device else batch
    engine = make_engine(seeded_resnet18, device="cuda", precision=precision)
    warm = engine.explain_batch(batch, SYNC_ROWS)
    activations = warm[2].retained[0].activation[None]  # row 2: layer4, keep_activations
    engine.predict(batch)
    engine.predict_tail("layer4", activations.clone(), batch[2:3])
    calls = 0
    real = transfer.to_host

    def counted(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        nonlocal calls
        calls += 1
        return real(tensors)

    monkeypatch.setattr(transfer, "to_host", counted)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = engine.explain_batch(batch, SYNC_ROWS)
        assert calls == 1
        engine.predict(batch)
        assert calls == 2
        engine.predict_tail("layer4", activations.clone(), batch[2:3])
        assert calls == 3
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for got, want in zip(results, warm, strict=True):
        assert got.classes == want.classes
        assert set(got.maps) == set(want.maps)
        assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in got.maps.values())
        assert all(r.activation.is_cuda and r.image.is_cuda for r in got.retained)
