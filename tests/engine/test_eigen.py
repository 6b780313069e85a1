"""EigenCAM, EigenGradCAM, Grad-CAM element-wise and eigen_smooth equal pytorch-grad-cam's, SVD
sign included (camserve.server.engine.eigen states the convention)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest, normalise, to_input
from camserve.server.engine.eigen import first_component
from tests._support.cams import SINGLE_PASS_REFERENCES, assert_maps_match_reference, reference_cam


def _reference_projection(maps: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's projection of (N, C, h, w) maps, flattened to (N, h * w)."""
    return get_2d_projection(maps).reshape(maps.shape[0], -1)


def _ours(maps: torch.Tensor) -> np.ndarray:
    flat = maps.movedim(1, -1).reshape(maps.shape[0], -1, maps.shape[1])
    return first_component(flat).numpy()


def test_reference_table_covers_every_single_pass_method() -> None:
    assert tuple(SINGLE_PASS_REFERENCES) == PASS_METHODS


@pytest.mark.parametrize(
    "shape", [(3, 512, 4, 4), (2, 64, 14, 14), (2, 16, 9, 7), (2, 2048, 7, 7), (1, 3, 40, 40)]
)
def test_projection_equals_pytorch_grad_cam_sign_included(shape: tuple[int, ...]) -> None:
    """Not just up to sign: the same LAPACK routine gives the same singular vector."""
    generator = torch.Generator().manual_seed(sum(shape))
    maps = torch.randn(shape, generator=generator).relu_() + 0.1 * torch.randn(
        shape, generator=generator
    )
    np.testing.assert_allclose(_ours(maps), _reference_projection(maps.numpy()), atol=1e-4)


def test_projection_of_real_activations_and_nan_handling(
    seeded_resnet18: nn.Module, random_images: Callable[..., torch.Tensor]
) -> None:
    seen: list[torch.Tensor] = []
    handle = seeded_resnet18.layer3.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.inference_mode():
            seeded_resnet18(random_images(4, (96, 96), seed=2))
    finally:
        handle.remove()
    maps = seen[0].clone()
    maps[0, 3, 1, 1] = float("nan")  # pytorch-grad-cam reads NaN as 0
    np.testing.assert_allclose(_ours(maps), _reference_projection(maps.numpy()), atol=1e-4)


def test_projection_keeps_the_device_and_degenerate_maps() -> None:
    assert first_component(torch.zeros(2, 1, 5)).shape == (2, 1)
    assert not first_component(torch.zeros(2, 1, 5)).any()  # one position: nothing to project
    assert first_component(torch.ones(3, 4, 6)).abs().max() == 0  # constant columns centre to 0


NEW_METHODS = ("gradcamelementwise", "eigencam", "eigengradcam")
# Modules of pytorch-grad-cam that call the projection by the name they imported.
PROJECTING_MODULES = ("base_cam", "eigen_cam", "eigen_grad_cam", "grad_cam_elementwise")
PROJECTING_MODULES += ("hirescam", "layer_cam")


def _reference(
    method: str,
    model: nn.Module,
    layer: str,
    batch: torch.Tensor,
    class_index: int,
    eigen_smooth: bool,
) -> np.ndarray:
    cam_class = SINGLE_PASS_REFERENCES[method]
    return reference_cam(cam_class, model, layer, batch, class_index, eigen_smooth=eigen_smooth)


EXACT_CASES = [
    pytest.param("seeded_resnet18", "layer3", (64, 64), NEW_METHODS, False, id="resnet18-plain"),
    pytest.param("seeded_resnet18", "layer3", (64, 64), PASS_METHODS, True, id="resnet18-eigen"),
    pytest.param("seeded_tiny", "head", (32, 32), NEW_METHODS, False, id="tiny-plain"),
]


@pytest.mark.parametrize(
    ("model", "layer", "size", "methods", "eigen_smooth"), EXACT_CASES, indirect=["model"]
)
def test_methods_match_pytorch_grad_cam_sign_included(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    layer: str,
    size: tuple[int, int],
    methods: tuple[str, ...],
    eigen_smooth: bool,
) -> None:
    """The three new methods as they are, and every method with eigen_smooth (the original five
    without it are checked in test_reference), sign included: with the reference's contiguous
    layout the activations and gradients are bit-equal, and these matrices have full rank, so
    LAPACK decides the sign the same way. `head` outputs a raw convolution: EigenCAM sees its
    negative values unchanged, as pytorch-grad-cam does."""
    batch = random_images(2, size, seed=11)
    engine = make_engine(model, channels_last=False)
    rows = [RowRequest(layer, methods, classes=(5,), eigen_smooth=eigen_smooth)] * 2
    results = engine.explain_batch(batch, rows)
    for method in methods:
        expected = _reference(method, model, layer, batch, 5, eigen_smooth)
        assert_maps_match_reference(results, method, 5, size, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_rank_deficient_maps_match_up_to_the_sign_of_each_projection(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    channels_last: bool,
) -> None:
    """Where a matrix is rank deficient, LAPACK's sign rests on rounding noise: genuinely
    arbitrary. The tiny net's class-5 weights are zero or negative for some channels, so the
    Grad-CAM++ and LayerCAM terms have all-zero channels, and the last-bit differences of
    computing the weights in another order (or of channels_last convolutions) can flip them.
    Each map must equal the reference's or the one the reference gives with every projection
    negated, and most must equal the reference's."""
    size = (32, 32)
    batch = random_images(4, size, seed=11)
    results = make_engine(seeded_tiny, channels_last=channels_last).explain_batch(
        batch, [RowRequest("head", PASS_METHODS, classes=(5,), eigen_smooth=True)] * 4
    )
    expected = {m: _reference(m, seeded_tiny, "head", batch, 5, True) for m in PASS_METHODS}
    import pytorch_grad_cam

    for name in PROJECTING_MODULES:
        module = getattr(pytorch_grad_cam, name)
        original = module.get_2d_projection
        monkeypatch.setattr(module, "get_2d_projection", lambda x, f=original: -f(x))
    flipped = {m: _reference(m, seeded_tiny, "head", batch, 5, True) for m in PASS_METHODS}
    same = 0
    for method in PASS_METHODS:
        for i, result in enumerate(results):
            ours = normalise(to_input(result.maps[(method, 5)], size)).numpy()
            if np.abs(ours - expected[method][i]).max() <= 1e-4:
                same += 1
            else:
                np.testing.assert_allclose(ours, flipped[method][i], atol=1e-4, err_msg=method)
    assert same >= 0.75 * len(PASS_METHODS) * len(results)


def test_eigencam_needs_no_gradient_and_is_the_same_for_every_class(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(1, (96, 96), seed=4)
    engine = make_engine(seeded_resnet18)
    alone = engine.explain_batch(batch, [RowRequest("layer4", ("eigencam",), top_k=3)])[0]
    mixed = engine.explain_batch(batch, [RowRequest("layer4", ("eigencam", "gradcam"), top_k=3)])[0]
    first = alone.maps[("eigencam", alone.classes[0])]
    for class_index in alone.classes:
        torch.testing.assert_close(alone.maps[("eigencam", class_index)], first)
        torch.testing.assert_close(mixed.maps[("eigencam", class_index)], first)
