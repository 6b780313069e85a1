"""Device JPEG decoding (`device_jpeg`), exercised on the CPU: the same geometry as the CPU
path, pixels within a few levels, every EXIF orientation uprighted, bad files left to the CPU
path, refused ones refused with its error."""

from __future__ import annotations

import pytest
import torch

from camserve.server.device_jpeg import is_jpeg, prepare_jpegs
from camserve.server.preprocess import ImageError, decode_for_model, prepare
from camserve.server.records import InputRecipe
from camserve.server.settings import IMAGENET_MEAN, IMAGENET_STD, LimitsSettings
from tests.server.test_preprocess import smooth_photo, with_orientation

RECIPE = InputRecipe(resize=64, crop=56, mean=IMAGENET_MEAN, std=IMAGENET_STD)
LIMITS = LimitsSettings()
CPU = torch.device("cpu")


def cpu_path(data: bytes) -> torch.Tensor:
    decoded = decode_for_model(data, "f", LIMITS, RECIPE, reduce=False)
    return prepare(decoded.image, RECIPE, False, decoded.original_size)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_path_matches_the_cpu_path(orientation: int) -> None:
    data = with_orientation(smooth_photo(120, 90), "JPEG", orientation, quality=95)
    assert is_jpeg(data)
    (prepared,) = prepare_jpegs([(data, "images[0].encoded")], RECIPE, LIMITS, CPU)
    assert prepared is not None
    expected = cpu_path(data)
    assert prepared.geometry == expected.geometry
    assert prepared.pixels.dtype == torch.uint8
    difference = (prepared.pixels.int() - expected.pixels.int()).abs().float()
    assert difference.mean() < 1.5
    assert difference.max() <= 12


def test_an_undecodable_jpeg_falls_back_alone() -> None:
    good = with_orientation(smooth_photo(120, 90), "JPEG", 1, quality=90)
    # A readable header with a Huffman table whose code counts overflow: decoders refuse it.
    table = good.index(b"\xff\xc4") + 5  # after the marker, length and table class
    broken = good[:table] + b"\xff" * 16 + good[table + 16 :]
    items = [(good, "a"), (broken, "b"), (good, "c")]
    results = prepare_jpegs(items, RECIPE, LIMITS, CPU)
    assert results[0] is not None
    assert results[1] is None  # prepared on the CPU path, which names what is wrong
    assert results[2] is not None
    assert torch.equal(results[0].pixels, results[2].pixels)


def test_refused_images_get_the_cpu_paths_error() -> None:
    data = with_orientation(smooth_photo(120, 90), "JPEG", 1)
    small = LimitsSettings(max_pixels=5000)
    with pytest.raises(ImageError, match="images\\[1\\].encoded: image is 120x90"):
        prepare_jpegs([(data, "images[1].encoded")], RECIPE, small, CPU)


@pytest.mark.gpu
def test_nvjpeg_batches_match_the_cpu_decoder() -> None:
    datas = [
        with_orientation(smooth_photo(120 + 8 * i, 90), "JPEG", 1 + i, quality=95) for i in range(8)
    ]
    items = [(data, f"images[{i}].encoded") for i, data in enumerate(datas)]
    on_gpu = prepare_jpegs(items, RECIPE, LIMITS, torch.device("cuda"))
    on_cpu = prepare_jpegs(items, RECIPE, LIMITS, CPU)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu is not None
        assert cpu is not None
        assert gpu.pixels.device.type == "cuda"
        assert gpu.geometry == cpu.geometry
        difference = (gpu.pixels.cpu().int() - cpu.pixels.int()).abs().float()
        assert difference.mean() < 1.5
