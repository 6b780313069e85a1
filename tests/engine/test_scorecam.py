"""ScoreCAM from forward-only masked rows equals pytorch-grad-cam's ScoreCAM."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, RowRequest, explain_all
from camserve.server.engine.gradient_free import ChannelPlan
from camserve.server.engine.jobs import run_forward
from camserve.server.engine.scorecam import masked_inputs, score_cam
from tests._support.cams import assert_method_matches_reference


@pytest.mark.parametrize(
    ("model", "layer", "size", "count"),
    [
        pytest.param("seeded_tiny", "act", (32, 32), 3, id="tiny-relu"),
        pytest.param("seeded_tiny", "head", (32, 32), 2, id="tiny-negative"),
        pytest.param("seeded_resnet18", "layer1", (64, 64), 1, id="resnet18-layer1"),
    ],
    indirect=["model"],
)
def test_scorecam_matches_pytorch_grad_cam(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    layer: str,
    size: tuple[int, int],
    count: int,
) -> None:
    batch = random_images(count, size, seed=12)
    classes = [4, 1, 4][:count]
    engine = make_engine(model)
    assert_method_matches_reference(engine, model, "scorecam", layer, batch, classes, chunk_rows=20)


@pytest.mark.slow
def test_scorecam_matches_pytorch_grad_cam_on_resnet18_layer4(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(1, (64, 64), seed=12)
    engine = make_engine(seeded_resnet18)
    assert_method_matches_reference(engine, seeded_resnet18, "scorecam", "layer4", batch, 3)


def test_masked_inputs_follow_the_reference_recipe() -> None:
    """Upsampled with align_corners=True, min-max scaled per channel, times the image."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 20, 24, generator=generator)
    activation = torch.randn(6, 5, 6, generator=generator)
    upsampled = torch.nn.UpsamplingBilinear2d(size=(20, 24))(activation[None])[0]
    low = upsampled.flatten(1).min(dim=1).values[:, None, None]
    high = upsampled.flatten(1).max(dim=1).values[:, None, None]
    expected = image[None] * ((upsampled - low) / (high - low + 1e-8))[:, None]
    torch.testing.assert_close(masked_inputs(image, activation, 0, 6), expected)
    torch.testing.assert_close(masked_inputs(image, activation, 2, 5), expected[2:5])
    with pytest.raises(EngineError, match=r"channel range \[5, 5\)"):
        masked_inputs(image, activation, 5, 5)
    with pytest.raises(EngineError, match=r"scores must be \(K, 6\)"):
        score_cam(activation, torch.zeros(1, 5))


def test_scorecam_and_gradcam_rows_share_an_explain_pass(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(2, (32, 32), seed=2)
    engine = make_engine(seeded_tiny)
    mixed = explain_all(
        engine,
        batch,
        [
            RowRequest("act", ("gradcam", "scorecam"), top_k=2),
            RowRequest("block", ("ablationcam", "gradcampp"), classes=(3,)),
        ],
    )
    assert set(mixed[0].maps) == {(m, c) for m in ("gradcam", "scorecam") for c in mixed[0].classes}
    assert set(mixed[1].maps) == {("ablationcam", 3), ("gradcampp", 3)}
    assert mixed[0].retained == ()
    assert mixed[1].retained == ()
    alone = explain_all(engine, batch[:1], [RowRequest("act", ("scorecam",), top_k=2)])[0]
    for class_index in alone.classes:
        torch.testing.assert_close(
            mixed[0].maps[("scorecam", class_index)],
            alone.maps[("scorecam", class_index)],
            rtol=1e-5,
            atol=1e-6,
        )


def test_pieces_of_different_input_sizes_or_layers_never_share_a_call(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = make_engine(seeded_tiny)
    kept = []
    for size, layer in (((32, 32), "act"), ((48, 48), "act"), ((32, 32), "block")):
        row = RowRequest(layer, (), classes=(0,), keep_activations=True)
        kept.append(engine.explain_batch(random_images(1, size), [row])[0])
    methods = [("scorecam", "ablationcam")] * len(kept)
    plan = ChannelPlan(kept, methods, eigen_smooth=[False] * 3, input_hw=(32, 32), chunk=100)
    jobs = plan.jobs()
    keys = [job.key for job in jobs]
    # ScoreCAM: the two 32x32 rows share a call whatever their layer; AblationCAM: none share.
    assert sorted(keys.count(key) for key in set(keys)) == [1, 1, 1, 1, 2]
    calls = []
    for name in ("predict", "predict_tail"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *a, _m=method, **k: calls.append(1) or _m(*a, **k))
    run_forward(engine, jobs)
    assert len(calls) == 5
    done = plan.finish()
    assert all(set(r.maps) == {("scorecam", 0), ("ablationcam", 0)} for r in done)
    assert all(not r.retained for r in done)
