"""aug_smooth equals pytorch-grad-cam's `aug_smooth=True` for single-pass and gradient-free
methods, and its six copies per image share the batch with other rows."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import ttach
from pytorch_grad_cam import AblationCAM, EigenCAM, GradCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from camserve.server.engine import CamEngine, RowRequest, explain_all
from camserve.server.engine.augment import AUGMENTATIONS, augment_images, undo
from tests._support.cams import reference_cam


def test_augmentations_are_ttachs() -> None:
    image = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    transforms = list(ttach.Compose([ttach.HorizontalFlip(), ttach.Multiply([0.9, 1, 1.1])]))
    assert len(transforms) == len(AUGMENTATIONS) == 6
    ours = augment_images(image[0])
    for i, (transform, augmentation) in enumerate(zip(transforms, AUGMENTATIONS, strict=True)):
        torch.testing.assert_close(ours[i], transform.augment_image(image)[0], rtol=0, atol=0)
        mask = torch.randn(1, 1, 5, 7)
        torch.testing.assert_close(undo(augmentation, mask), transform.deaugment_mask(mask))


@pytest.mark.parametrize(
    ("method", "reference", "eigen_smooth"),
    [
        ("gradcam", GradCAM, False),
        ("xgradcam", XGradCAM, True),
        ("eigencam", EigenCAM, False),
    ],
)
def test_single_pass_methods_match_pytorch_grad_cam(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    method: str,
    reference: type[BaseCAM],
    eigen_smooth: bool,
) -> None:
    size = (64, 64)
    batch = random_images(2, size, seed=13)
    rows = [RowRequest("layer3", (method,), (6,), eigen_smooth=eigen_smooth, aug_smooth=True)]
    results = make_engine(seeded_resnet18, channels_last=False).explain_batch(batch, rows * 2)
    expected = reference_cam(
        reference, seeded_resnet18, "layer3", batch, 6, aug_smooth=True, eigen_smooth=eigen_smooth
    )
    ours = torch.stack([r.maps[(method, 6)] for r in results])
    assert ours.shape == (2, *size)  # at input resolution, already averaged
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "reference"), [("ablationcam", AblationCAM), ("scorecam", ScoreCAM)]
)
def test_gradient_free_methods_match_pytorch_grad_cam(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    method: str,
    reference: type[BaseCAM],
) -> None:
    size = (32, 32)
    batch = random_images(2, size, seed=14)
    rows = [RowRequest("act", (method,), (3,), aug_smooth=True)] * 2
    results = explain_all(make_engine(seeded_tiny), batch, rows, chunk_rows=50)
    expected = reference_cam(reference, seeded_tiny, "act", batch, 3, aug_smooth=True)
    ours = torch.stack([r.maps[(method, 3)] for r in results])
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4)


def test_aug_rows_share_a_batch_with_plain_rows(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """Six copies join the batch; the un-augmented copy gives the predictions and classes."""
    batch = random_images(3, (32, 32), seed=15)
    engine = make_engine(seeded_tiny)
    rows = [
        RowRequest("act", ("gradcam",), top_k=2),
        RowRequest("act", ("gradcam", "layercam"), top_k=2, aug_smooth=True, keep_activations=True),
        RowRequest("block", ("hirescam",), classes=(1,), aug_smooth=True),
    ]
    together = engine.explain_batch(batch, rows)
    logits = engine.predict(batch)
    for i, row in enumerate(rows):
        alone = engine.explain_batch(batch[i : i + 1], [row])[0]
        assert together[i].classes == alone.classes
        assert together[i].maps.keys() == alone.maps.keys()
        torch.testing.assert_close(together[i].logits, logits[i], rtol=1e-5, atol=1e-5)
        for key, value in alone.maps.items():
            torch.testing.assert_close(together[i].maps[key], value, rtol=1e-5, atol=1e-5)
    assert together[1].classes == tuple(logits[1].topk(2).indices.tolist())
    assert together[0].maps[("gradcam", together[0].classes[0])].shape == (8, 8)
    assert together[1].maps[("gradcam", together[1].classes[0])].shape == (32, 32)
    kept = together[1].retained
    assert [r.augmentation for r in kept] == list(AUGMENTATIONS)
    torch.testing.assert_close(kept[3].image.cpu(), batch[1].flip(-1) * 0.9)
    assert together[2].retained == ()
