"""The wire tensor helpers both sides share."""

from __future__ import annotations

import warnings

import numpy as np

from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import from_proto, to_proto


def test_float16_saturates_instead_of_overflowing_to_infinity() -> None:
    raw = np.array([[7e5, -7e5], [1.5, np.nan]], dtype=np.float32)  # a raw map can be this large
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        decoded = from_proto(to_proto(raw, pb.DTYPE_FLOAT16))
    largest = float(np.finfo(np.float16).max)
    assert decoded.dtype == np.float16
    assert decoded[0, 0] == largest
    assert decoded[0, 1] == -largest
    assert decoded[1, 0] == 1.5
    assert np.isnan(decoded[1, 1])


def test_round_trip_keeps_shape_dtype_and_values() -> None:
    for dtype in (np.float32, np.float16, np.uint8):
        array = (np.arange(24).reshape(2, 3, 4) % 200).astype(dtype)
        decoded = from_proto(to_proto(array))
        assert decoded.dtype == dtype
        np.testing.assert_array_equal(decoded, array)
