"""Turning every accepted image form into a wire Image, and refusing the rest by name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.client.images import to_pil, to_wire
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import from_proto
from tests._support.servers import CAT_BYTES, CAT_JPEG


def test_paths_and_bytes_travel_as_the_file_bytes() -> None:
    assert to_wire(CAT_JPEG).encoded == CAT_BYTES
    assert to_wire(str(CAT_JPEG)).encoded == CAT_BYTES
    assert to_wire(CAT_BYTES).encoded == CAT_BYTES
    assert to_wire(bytearray(CAT_BYTES)).encoded == CAT_BYTES
    assert to_wire(memoryview(CAT_BYTES)).encoded == CAT_BYTES


def test_pil_images_travel_as_uint8_rgb_tensors() -> None:
    picture = Image.new("L", (5, 3), 200)  # grey: converted to RGB
    wire = to_wire(picture)
    assert wire.WhichOneof("source") == "tensor"
    assert wire.tensor.dtype == pb.DTYPE_UINT8
    array = from_proto(wire.tensor)
    assert array.shape == (3, 5, 3)
    assert (array == 200).all()


def test_uint8_arrays_travel_as_they_are() -> None:
    array = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    wire = to_wire(array)
    assert wire.tensor.dtype == pb.DTYPE_UINT8
    np.testing.assert_array_equal(from_proto(wire.tensor), array)


def test_float_arrays_travel_as_float32_chw() -> None:
    array = np.random.default_rng(0).normal(size=(3, 8, 8))  # float64: converted
    wire = to_wire(array)
    assert wire.tensor.dtype == pb.DTYPE_FLOAT32
    assert list(wire.tensor.shape) == [3, 8, 8]
    np.testing.assert_allclose(from_proto(wire.tensor), array.astype(np.float32))


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.zeros((4, 4), np.uint8), ValueError, "HxWx3"),
        (np.zeros((4, 4, 4), np.uint8), ValueError, "RGBA"),
        (np.zeros((4, 4, 3), np.float32), ValueError, "3xHxW"),
        (np.zeros((4, 4, 3), np.int64), TypeError, "dtype int64"),
        (b"", ValueError, "empty"),
        (12, TypeError, "got int"),
    ],
)
def test_other_forms_are_refused_with_the_accepted_ones_named(image, error, match) -> None:
    with pytest.raises(error, match=match):
        to_wire(image)


def test_a_missing_file_raises_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        to_wire(tmp_path / "missing.jpg")


def test_to_pil_gives_rgb_pictures_of_every_drawable_form() -> None:
    expected = Image.open(CAT_JPEG).convert("RGB")
    for form in (CAT_JPEG, str(CAT_JPEG), CAT_BYTES, expected.convert("L"), np.asarray(expected)):
        picture = to_pil(form)
        assert picture.mode == "RGB"
        assert picture.size == expected.size
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 2)).save(buffer, format="PNG")
    assert to_pil(buffer.getvalue()).mode == "RGB"


def test_to_pil_refuses_normalised_arrays() -> None:
    with pytest.raises(TypeError, match="overlays need"):
        to_pil(np.zeros((3, 4, 4), np.float32))


def test_overlays_draw_on_the_photo_turned_upright_by_its_exif_orientation(
    tmp_path: Path,
) -> None:
    """The server explains an EXIF-rotated photo upright, so the picture under the overlay must
    be upright too, or the heatmap lands on the wrong part of it."""
    picture = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    picture.save(path, format="JPEG", exif=exif.tobytes())
    assert to_pil(path).size == (20, 40)
    assert to_pil(path.read_bytes()).size == (20, 40)
