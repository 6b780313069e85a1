"""AblationCAM on the tail of the network equals pytorch-grad-cam's AblationCAM (all channels)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, RowRequest, explain_all
from camserve.server.engine.ablation import ABLATION_OFFSET, ablated_rows, ablation_value
from camserve.server.engine.gradient_free import ChannelPlan, follow_ups
from camserve.server.engine.jobs import run_forward, waves
from tests._support.cams import (
    GRADIENT_FREE_REFERENCES,
    assert_maps_match_reference,
    assert_method_matches_reference,
    reference_cam,
)


@pytest.mark.parametrize(
    ("model", "layer", "reference_batch"),
    [
        pytest.param("seeded_tiny", "act", 32, id="relu-output"),
        pytest.param("seeded_tiny", "block", 32, id="residual-block"),
        # A raw convolution has negative values: ablated channels go to min - 1e7, which the
        # reference applies only to the first row of each of its batches (see ablation.py).
        pytest.param("seeded_tiny", "head", 1, id="negative-values"),
        # fx cannot trace this twin: the fallback runs the whole model with the layer replaced.
        pytest.param("seeded_branchy", "act", 32, id="untraceable"),
    ],
    indirect=["model"],
)
def test_ablationcam_matches_pytorch_grad_cam(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    layer: str,
    reference_batch: int,
) -> None:
    batch = random_images(3, (32, 32), seed=9)
    # Chunks of 10 rows: pieces of one image are split and pieces of two images share a batch.
    assert_method_matches_reference(
        make_engine(model),
        model,
        "ablationcam",
        layer,
        batch,
        [2, 7, 2],
        chunk_rows=10,
        batch_size=reference_batch,
    )


@pytest.mark.slow
def test_ablationcam_matches_pytorch_grad_cam_on_resnet18(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(1, (64, 64), seed=9)
    engine = make_engine(seeded_resnet18)
    assert_method_matches_reference(engine, seeded_resnet18, "ablationcam", "layer4", batch, 3)


def test_chunking_does_not_change_the_maps(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(2, (32, 32), seed=4)
    engine = make_engine(seeded_tiny)
    rows = [RowRequest("act", ("ablationcam",), top_k=2)] * 2
    one_by_one = explain_all(engine, batch, rows, chunk_rows=1)
    at_once = explain_all(engine, batch, rows, chunk_rows=1000)
    for a, b in zip(one_by_one, at_once, strict=True):
        assert a.maps.keys() == b.maps.keys()
        for key, value in a.maps.items():
            torch.testing.assert_close(value, b.maps[key], rtol=1e-5, atol=1e-6)


def test_ablated_rows_change_one_channel_each_and_keep_the_layout() -> None:
    activation = torch.rand(1, 6, 3, 4).contiguous(memory_format=torch.channels_last)[0]
    activation[0, 0, 0] = 0.0
    rows = ablated_rows(activation, 2, 5)
    assert rows.shape == (3, 6, 3, 4)
    assert rows.is_contiguous(memory_format=torch.channels_last)
    for i, channel in enumerate(range(2, 5)):
        expected = activation.clone()
        expected[channel] = 0.0
        torch.testing.assert_close(rows[i], expected, rtol=0, atol=0)
    negative = activation - 1.0
    assert ablation_value(negative) == pytest.approx(float(negative.min()) - ABLATION_OFFSET)
    with pytest.raises(EngineError, match=r"channel range \[4, 9\)"):
        ablated_rows(activation, 4, 9)


def test_building_a_piece_never_reads_a_tensor_on_the_host(monkeypatch) -> None:
    # Reading a device tensor's value on the host waits for the device: once per piece, before.
    activation = torch.rand(6, 3, 4) - 0.5

    def refuse(*args: object) -> None:
        raise AssertionError("a tensor was read on the host")

    with monkeypatch.context() as patched:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            patched.setattr(torch.Tensor, name, refuse)
        rows = ablated_rows(activation, 1, 4)
    low = float(activation.min()) - ABLATION_OFFSET
    for i, channel in enumerate(range(1, 4)):
        assert bool((rows[i, channel] == torch.tensor(low)).all())


def test_steps_for_a_runtime_and_their_errors(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """The runtime's order: explain with keep_activations, a plan, its jobs, run, finish."""
    batch = random_images(2, (32, 32), seed=3)
    engine = make_engine(seeded_tiny)
    plain = engine.explain_batch(batch[:1], [RowRequest("act", ("gradcam",), classes=(1,))])
    with pytest.raises(EngineError, match="keep_activations=True"):
        follow_ups(plain[0], "ablationcam")
    results = engine.explain_batch(
        batch, [RowRequest("act", (), classes=(1, 4), keep_activations=True)] * 2
    )
    assert results[0].maps == {}
    retained = results[0].retained[0]
    assert retained.activation.shape == (24, 8, 8)
    assert retained.image.shape == (3, 32, 32)
    assert retained.activation.device == engine.device
    work = follow_ups(results[0], "ablationcam")
    with pytest.raises(EngineError, match="24 channels are not scored yet"):
        work[0].maps()
    plan = ChannelPlan(
        results,
        [("gradcam", "ablationcam")] * 2,  # the pass's own methods are not the plan's
        eigen_smooth=[False, False],
        input_hw=(32, 32),
        chunk=16,
        tail_fraction=0.25,
    )
    jobs = plan.jobs()
    assert [job.rows for job in jobs] == [16, 8, 16, 8]
    assert plan.cost() == sum(job.cost for job in jobs) == 4 + 2 + 4 + 2
    for wave in waves(jobs, 20, size=lambda job: job.rows):
        run_forward(engine, wave)
    done = plan.finish()
    assert [tuple(r.maps) for r in done] == [(("ablationcam", 1), ("ablationcam", 4))] * 2
    assert done[0].maps[("ablationcam", 1)].shape == (8, 8)
    assert done[0].maps[("ablationcam", 1)].device.type == "cpu"
    with pytest.raises(
        EngineError,
        match="needs forward-only rows of the modules after the layer",
    ):
        engine.explain_batch(batch[:1], [RowRequest("act", ("ablationcam",))])


def test_gradient_free_methods_with_eigen_smooth_match(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """Both gradient-free methods project their weighted channels with eigen_smooth (in the
    reference's contiguous layout, for bit-equal matrices: see camserve.server.engine.eigen)."""
    size = (32, 32)
    batch = random_images(2, size, seed=9)
    engine = make_engine(seeded_tiny, channels_last=False)
    rows = [RowRequest("block", ("ablationcam", "scorecam"), (2,), eigen_smooth=True)] * 2
    results = explain_all(engine, batch, rows)
    for method, reference in GRADIENT_FREE_REFERENCES.items():
        expected = reference_cam(reference, seeded_tiny, "block", batch, 2, eigen_smooth=True)
        assert_maps_match_reference(results, method, 2, size, expected)
