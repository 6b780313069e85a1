"""A batch's model input built from prepared pixels: the same values whatever the mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.server.preprocess import prepare
from camserve.server.records import InputRecipe
from camserve.server.settings import IMAGENET_MEAN, IMAGENET_STD
from camserve.server.staging import InputStager
from tests._support.servers import seeded_images

RECIPE = InputRecipe(resize=0, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def prepared_images(count: int) -> list:
    return [
        prepare(Image.fromarray(picture), RECIPE, keep_original=False)
        for picture in seeded_images(count, size=(40, 48), seed=3)
    ]


def test_uint8_batches_equal_the_images_normalised_one_by_one() -> None:
    images = prepared_images(4)
    stager = InputStager(torch.device("cpu"), RECIPE.mean, RECIPE.std)
    batch = stager.batch([image.pixels for image in images])
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([image.tensor for image in images]))


def test_batches_are_channels_last_whatever_layout_the_pixels_have() -> None:
    """Decoded pixels view the decoder's (H, W, 3) memory, and the batch keeps that layout (the
    one the CPU engine runs); contiguous (3, H, W) pixels give the same values."""
    images = prepared_images(3)
    assert all(image.pixels.permute(1, 2, 0).is_contiguous() for image in images)
    stager = InputStager(torch.device("cpu"), RECIPE.mean, RECIPE.std)
    batch = stager.batch([image.pixels for image in images])
    assert batch.is_contiguous(memory_format=torch.channels_last)
    planar = stager.batch([image.pixels.contiguous() for image in images])
    assert torch.equal(planar, batch)
    per_channel = torch.stack([image.pixels.contiguous() for image in images]).float()
    mean = torch.tensor(RECIPE.mean).view(3, 1, 1)
    std = torch.tensor(RECIPE.std).view(3, 1, 1)
    assert torch.equal(batch, per_channel.div_(255).sub_(mean).div_(std))


def test_mixed_batches_keep_each_row_in_place() -> None:
    """Ready float inputs are used as they are; uint8 rows are normalised; order is kept."""
    images = prepared_images(3)
    ready = torch.randn(3, RECIPE.crop, RECIPE.crop)
    pixels = [images[0].pixels, ready, images[1].pixels, images[2].pixels]
    batch = InputStager(torch.device("cpu"), RECIPE.mean, RECIPE.std).batch(pixels)
    expected = torch.stack([images[0].tensor, ready, images[1].tensor, images[2].tensor])
    assert torch.equal(batch, expected)
    only_ready = InputStager(torch.device("cpu"), RECIPE.mean, RECIPE.std).batch([ready])
    assert torch.equal(only_ready, ready[None])
    # Float inputs in (3, H, W) memory are transposed by the one copy into the batch.
    assert only_ready.is_contiguous(memory_format=torch.channels_last)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        InputStager(torch.device("cpu"), RECIPE.mean, RECIPE.std).batch([])


@pytest.mark.gpu
def test_cuda_batches_go_through_the_pinned_buffer_and_match_the_cpu() -> None:
    images = prepared_images(5)
    stager = InputStager(torch.device("cuda"), RECIPE.mean, RECIPE.std)
    for count in (5, 2, 5):  # reuses the buffer, smaller and again full
        pixels = [image.pixels for image in images[:count]]
        batch = stager.batch(pixels)
        assert batch.device.type == "cuda"
        expected = torch.stack([image.tensor for image in images[:count]])
        np.testing.assert_allclose(batch.cpu().numpy(), expected.numpy(), rtol=0, atol=1e-6)
