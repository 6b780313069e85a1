"""Conversion between numpy arrays and the v1 wire `Tensor` (little-endian bytes, C order).

Shared by the client SDK and the server so both sides read and write tensors the same way.
Needs numpy only, never torch.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from camserve.v1 import explain_pb2 as pb

_WIRE_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_DTYPE_NAMES: dict[int, str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_UINT8: "uint8",
}


class TensorFormatError(ValueError):
    """A wire tensor whose dtype, shape and byte length do not agree."""


def wire_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a wire DType; DTYPE_UNSPECIFIED means float32."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        dtype = pb.DTYPE_FLOAT32
    try:
        return _WIRE_DTYPES[dtype]
    except KeyError:
        raise TensorFormatError(
            f"unknown dtype {dtype}; use one of {sorted(_DTYPE_NAMES.values())}"
        ) from None


def dtype_name(dtype: int) -> str:
    """A readable name for a wire DType, for messages."""
    return _DTYPE_NAMES.get(dtype, "float32" if dtype == pb.DTYPE_UNSPECIFIED else str(dtype))


def _own_dtype(array: np.ndarray) -> int:
    """The wire DType of `array`'s own dtype; TensorFormatError for dtypes that cannot travel."""
    code = next((k for k, v in _WIRE_DTYPES.items() if v == array.dtype.newbyteorder("<")), -1)
    if code == -1:
        raise TensorFormatError(
            f"arrays of dtype {array.dtype} cannot travel; use float32, float16 or uint8"
        )
    return code


def to_proto(array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """Encodes `array` (converted to `dtype` when given, else to its own wire dtype)."""
    if dtype is None:
        dtype = _own_dtype(array)
    target = wire_dtype(dtype)
    if target == np.float16 and array.dtype.kind == "f" and array.dtype.itemsize > 2:
        # Values beyond float16's range saturate at its largest finite value instead of
        # becoming infinities (a raw map can exceed 65504); NaN stays NaN.
        limit = float(np.finfo(np.float16).max)
        array = np.clip(array, -limit, limit)
    data = np.ascontiguousarray(array, dtype=target).tobytes()
    wire = cast("pb.DType", dtype or pb.DTYPE_FLOAT32)
    return pb.Tensor(dtype=wire, shape=list(array.shape), data=data)


def fill_header(tensor: pb.Tensor, array: np.ndarray) -> memoryview:
    """Sets `tensor`'s dtype and shape for `array` (in its own wire dtype) and returns the bytes
    that belong in `tensor.data`, without copying them: for writers that send large tensors
    without building them into a message first (`to_proto(array)` is the same tensor)."""
    dtype = _own_dtype(array)
    tensor.dtype = cast("pb.DType", dtype)
    tensor.shape[:] = array.shape
    contiguous = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[dtype])
    return memoryview(contiguous.reshape(-1).view(np.uint8).data)


def from_proto(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """Decodes a wire tensor into a read-only numpy array, checking shape against byte length."""
    try:
        dtype = wire_dtype(tensor.dtype)
    except TensorFormatError as exc:
        raise TensorFormatError(f"{field}.dtype: {exc}") from None
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"{field}.shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # exact integers: a huge shape must not wrap around
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorFormatError(
            f"{field}.data holds {len(tensor.data)} bytes but shape {list(shape)} of "
            f"{dtype_name(tensor.dtype)} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
