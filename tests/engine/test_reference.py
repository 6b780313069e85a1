"""The five gradient-weighted methods equal pytorch-grad-cam 1.5.7 after
`normalise(to_input(...))`, to 1e-4 (the newer ones: test_eigen, test_ablation, test_scorecam)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest
from camserve.server.engine.registry import REGISTRY
from tests._support.cams import (
    GRADIENT_WEIGHTED_REFERENCES,
    assert_maps_match_reference,
    normalised_maps,
    reference_cam,
)

CASES = [
    pytest.param("seeded_resnet18", "layer4", (224, 224), id="resnet18"),
    pytest.param("seeded_vgg11", "features", (128, 128), id="vgg11"),
    pytest.param("lite0", "head", (224, 224), id="efficientnet_lite0"),
]


def test_method_table_covers_the_public_names() -> None:
    assert tuple(m.name for m in REGISTRY if m.kernel is not None) == PASS_METHODS
    assert PASS_METHODS[: len(GRADIENT_WEIGHTED_REFERENCES)] == tuple(GRADIENT_WEIGHTED_REFERENCES)


@pytest.mark.parametrize(("model", "layer", "size"), CASES, indirect=["model"])
def test_every_method_matches_pytorch_grad_cam(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    layer: str,
    size: tuple[int, int],
) -> None:
    batch = random_images(2, size, seed=7)
    engine = make_engine(model)
    # Row 0 names two classes explicitly, row 1 asks for its top 2: both paths, K = 2.
    five = tuple(GRADIENT_WEIGHTED_REFERENCES)
    rows = [RowRequest(layer, five, classes=(3, 1)), RowRequest(layer, five, top_k=2)]
    results = engine.explain_batch(batch, rows)
    assert results[1].classes == tuple(engine.predict(batch[1:]).topk(2).indices[0].tolist())

    for method, reference_class in GRADIENT_WEIGHTED_REFERENCES.items():
        for slot in range(2):
            classes = [r.classes[slot] for r in results]
            expected = reference_cam(reference_class, model, layer, batch, classes)
            assert_maps_match_reference(
                results, method, classes, size, expected, f"{method}, class slot {slot}"
            )


def test_tiny_maps_match_once_above_the_reference_epsilon(
    seeded_mobilenet: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """A seeded MobileNetV3's raw maps peak near 1e-11, where pytorch-grad-cam's 1e-7 epsilon in
    its min-max scaling shifts its output by about 1e-4. camserve's normalisation is exactly
    scale-invariant: scaling the classifier by 1e8 scales the gradients by 1e8, hence the raw maps
    of the four methods linear in the gradient, and leaves camserve's normalised maps unchanged.
    At that scale the reference's epsilon is negligible and all five methods agree with it."""
    size = (128, 128)
    batch = random_images(2, size, seed=7)
    scaled = copy.deepcopy(seeded_mobilenet)
    with torch.no_grad():
        scaled.classifier[-1].weight.mul_(1e8)
        scaled.classifier[-1].bias.mul_(1e8)
    rows = [RowRequest("features", tuple(GRADIENT_WEIGHTED_REFERENCES), classes=(3,))] * 2
    tiny = make_engine(seeded_mobilenet).explain_batch(batch, rows)
    large = make_engine(scaled).explain_batch(batch, rows)
    assert max(float(m.max()) for r in tiny for m in r.maps.values()) < 1e-7
    for method, reference_class in GRADIENT_WEIGHTED_REFERENCES.items():
        if method != "gradcampp":  # Grad-CAM++'s alphas are not homogeneous in the gradient
            torch.testing.assert_close(
                normalised_maps(tiny, method, 3, size),
                normalised_maps(large, method, 3, size),
                atol=1e-4,
                rtol=0,
            )
        expected = reference_cam(reference_class, scaled, "features", batch, 3)
        assert_maps_match_reference(large, method, 3, size, expected)
