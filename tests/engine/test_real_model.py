"""The pretrained EfficientNet-Lite0: the wrapper is faithful and maps are class-discriminative."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camserve.server.engine import PASS_METHODS, CamEngine, RowRequest, normalise, to_input

CAT = 285  # Egyptian cat
ESPRESSO = 967


def test_wrapper_matches_the_original_model(
    lite0: nn.Module, lite0_original: nn.Module, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(2, (224, 224), seed=21)
    with torch.inference_mode():
        torch.testing.assert_close(lite0(batch), lite0_original(batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("left", "right"), [("chelsea.jpg", "coffee.jpg"), ("coffee.jpg", "chelsea.jpg")]
)
def test_maps_follow_the_class_asked_for(
    lite0: nn.Module,
    make_engine: Callable[..., CamEngine],
    lite_side_by_side: Callable[[str, str], torch.Tensor],
    left: str,
    right: str,
) -> None:
    """A cat and an espresso side by side: each class's map sits on its own half. EigenCAM is
    left out: it explains the activations' main component, the same map for every class."""
    engine = make_engine(lite0)
    pair = lite_side_by_side(left, right)
    result = engine.explain_batch(
        pair, [RowRequest("head", PASS_METHODS, classes=(CAT, ESPRESSO))]
    )[0]
    top5 = set(result.probabilities.topk(5).indices.tolist())
    assert {CAT, ESPRESSO} <= top5
    cat_side = slice(0, 7) if left == "chelsea.jpg" else slice(7, 14)
    cup_side = slice(7, 14) if left == "chelsea.jpg" else slice(0, 7)
    for method in (m for m in PASS_METHODS if m != "eigencam"):
        cat_map = result.maps[(method, CAT)]
        cup_map = result.maps[(method, ESPRESSO)]
        assert cat_map.shape == (7, 14)
        cat_share = float(cat_map[:, cat_side].sum() / cat_map.sum())
        cup_share = float(cup_map[:, cup_side].sum() / cup_map.sum())
        floor = 0.8 if method in ("gradcam", "xgradcam", "hirescam") else 0.6
        assert cat_share > floor, (method, cat_share)
        assert cup_share > floor, (method, cup_share)


def test_wide_input_matches_pytorch_grad_cam(
    lite0: nn.Module,
    make_engine: Callable[..., CamEngine],
    lite_side_by_side: Callable[[str, str], torch.Tensor],
) -> None:
    pair = lite_side_by_side("chelsea.jpg", "coffee.jpg")
    result = make_engine(lite0).explain_batch(pair, [RowRequest("head", classes=(CAT, ESPRESSO))])[
        0
    ]
    with GradCAM(model=lite0, target_layers=[lite0.head]) as cam:
        for class_index in (CAT, ESPRESSO):
            expected = cam(input_tensor=pair, targets=[ClassifierOutputTarget(class_index)])[0]
            ours = normalise(to_input(result.maps[("gradcam", class_index)], (224, 448)))
            np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)
