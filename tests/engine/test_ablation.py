"""AblationCAM on the tail of the network equals pytorch-grad-cam's AblationCAM (all channels)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camserve.server.engine import (
    CamEngine,
    EngineError,
    RowRequest,
    explain_all,
    normalise,
    to_input,
)
from camserve.server.engine.ablation import ABLATION_OFFSET, ablated_rows, ablation_value
from camserve.server.engine.gradient_free import follow_ups, pack, pieces, run_pieces


def _reference(
    model: nn.Module, layer: str, batch: torch.Tensor, classes: list[int], batch_size: int = 32
) -> np.ndarray:
    with AblationCAM(
        model=model, target_layers=[model.get_submodule(layer)], batch_size=batch_size
    ) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in classes])


def _normalised(
    results: list, method: str, classes: list[int], size: tuple[int, int]
) -> np.ndarray:
    maps = [
        normalise(to_input(r.maps[(method, c)], size))
        for r, c in zip(results, classes, strict=True)
    ]
    return torch.stack(maps).numpy()


@pytest.mark.parametrize(
    ("model_fixture", "layer", "reference_batch"),
    [
        pytest.param("seeded_tiny", "act", 32, id="relu-output"),
        pytest.param("seeded_tiny", "block", 32, id="residual-block"),
        # A raw convolution has negative values: ablated channels go to min - 1e7, which the
        # reference applies only to the first row of each of its batches (see ablation.py).
        pytest.param("seeded_tiny", "head", 1, id="negative-values"),
        # fx cannot trace this twin: the fallback runs the whole model with the layer replaced.
        pytest.param("seeded_branchy", "act", 32, id="untraceable"),
    ],
)
def test_ablationcam_matches_pytorch_grad_cam(
    request: pytest.FixtureRequest,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model_fixture: str,
    layer: str,
    reference_batch: int,
) -> None:
    model = request.getfixturevalue(model_fixture)
    size = (32, 32)
    batch = random_images(3, size, seed=9)
    classes = [2, 7, 2]
    engine = make_engine(model)
    rows = [RowRequest(layer, ("ablationcam",), classes=(c,)) for c in classes]
    # Chunks of 10 rows: pieces of one image are split and pieces of two images share a batch.
    results = explain_all(engine, batch, rows, chunk_rows=10)
    expected = _reference(model, layer, batch, classes, reference_batch)
    np.testing.assert_allclose(
        _normalised(results, "ablationcam", classes, size), expected, atol=1e-4
    )


@pytest.mark.slow
def test_ablationcam_matches_pytorch_grad_cam_on_resnet18(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    size = (64, 64)
    batch = random_images(1, size, seed=9)
    results = explain_all(
        make_engine(seeded_resnet18), batch, [RowRequest("layer4", ("ablationcam",), (3,))]
    )
    expected = _reference(seeded_resnet18, "layer4", batch, [3])
    np.testing.assert_allclose(_normalised(results, "ablationcam", [3], size), expected, atol=1e-4)


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


def test_steps_for_a_runtime_and_their_errors(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """The runtime's order: explain with keep_activations, follow-ups, pieces, run, maps."""
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
    work = [f for r in results for f in follow_ups(r, "ablationcam")]
    with pytest.raises(EngineError, match="24 channels are not scored yet"):
        work[0].maps()
    batches = pack([p for f in work for p in pieces(f, 16)], max_rows=20)
    assert [sum(p.rows for p in b) for b in batches] == [16, 8, 16, 8]
    for chunk in batches:
        run_pieces(engine, chunk)
    assert all(f.done for f in work)
    assert work[0].maps().shape == (2, 8, 8)
    assert work[0].maps().device.type == "cpu"
    with pytest.raises(EngineError, match="gradient-free and needs forward-only rows"):
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
    targets = [ClassifierOutputTarget(2)] * 2
    for method, reference in (("ablationcam", AblationCAM), ("scorecam", ScoreCAM)):
        with reference(model=seeded_tiny, target_layers=[seeded_tiny.block]) as cam:
            expected = cam(input_tensor=batch, targets=targets, eigen_smooth=True)
        ours = _normalised(results, method, [2, 2], size)
        np.testing.assert_allclose(ours, expected, atol=1e-4, err_msg=method)
