"""Pickling control messages whose tensors travel through a shared-memory ring.

`dumps` pickles a message (a tuple of dataclasses, dicts, exceptions...) but writes every torch
tensor and numeric numpy array into the ring, leaving only (dtype, shape, offset) in the pickle;
`loads` copies them back out. So a message's bytes on the socket are its structure alone,
however large its pixels or maps, and the ring is free again as soon as `loads` returns.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

from camserve.server.ipc.rings import ShmRing

_NUMERIC_KINDS = frozenset("biufc")


class _RingPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, ring: ShmRing) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ring = ring

    def persistent_id(self, obj: Any) -> Any:  # noqa: ANN401 - pickle's own hook
        if isinstance(obj, torch.Tensor):
            return _put_tensor(self._ring, obj)
        if type(obj) is np.ndarray and obj.dtype.kind in _NUMERIC_KINDS:
            return _put_array(self._ring, obj)
        return None


class _RingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, ring: ShmRing) -> None:
        super().__init__(file)
        self._ring = ring

    def persistent_load(self, pid: Any) -> Any:  # noqa: ANN401 - pickle's own hook
        kind, dtype, shape, offset, nbytes, dims = pid
        if kind == "t":
            if not nbytes:
                return torch.empty(shape, dtype=dtype)
            raw = self._ring.data[offset : offset + nbytes]
            if dims is None:
                return raw.view(dtype).view(shape).clone()
            dense = raw.view(dtype).view([shape[d] for d in dims])
            return dense.permute(_inverse(dims)).clone()  # clone keeps the strides
        if not nbytes:
            return np.empty(shape, dtype=dtype)
        raw_array = self._ring.array[offset : offset + nbytes]
        return raw_array.view(dtype).reshape(shape).copy()


def _put_tensor(ring: ShmRing, tensor: torch.Tensor) -> tuple[object, ...]:
    """Writes the tensor's elements into the ring; a permutation of a contiguous tensor (such as
    (3, H, W) pixels over (H, W, 3) memory) is written in its memory order and read back with
    the same strides, so neither side makes a transposing copy."""
    tensor = tensor.detach()
    nbytes = tensor.numel() * tensor.element_size()
    shape = tuple(tensor.shape)
    if not nbytes:
        return ("t", tensor.dtype, shape, 0, 0, None)
    offset = ring.alloc(nbytes)
    dims = _memory_order(tensor)
    dense = tensor if dims is None else tensor.permute(dims)
    ring.data[offset : offset + nbytes].view(tensor.dtype).view(dense.shape).copy_(dense)
    return ("t", tensor.dtype, shape, offset, nbytes, dims)


def _memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The dimensions from outermost to innermost in memory when the tensor is a permutation of
    a contiguous one other than itself; None otherwise (contiguous, or not dense)."""
    if tensor.is_contiguous():
        return None
    strides = tensor.stride()
    dims = tuple(sorted(range(tensor.dim()), key=lambda d: -strides[d]))
    return dims if tensor.permute(dims).is_contiguous() else None


def _inverse(dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dims.index(dim) for dim in range(len(dims)))


def _put_array(ring: ShmRing, array: np.ndarray) -> tuple[object, ...]:
    nbytes = array.nbytes
    if not nbytes:
        return ("a", array.dtype.str, array.shape, 0, 0, None)
    offset = ring.alloc(nbytes)
    ring.array[offset : offset + nbytes].view(array.dtype).reshape(array.shape)[...] = array
    return ("a", array.dtype.str, array.shape, offset, nbytes, None)


def dumps(message: object, ring: ShmRing) -> bytes:
    """The message's pickle, its tensors written into `ring` (RingFull when it lacks room)."""
    buffer = io.BytesIO()
    _RingPickler(buffer, ring).dump(message)
    return buffer.getvalue()


def loads(payload: bytes | memoryview, ring: ShmRing) -> Any:  # noqa: ANN401 - whatever was sent
    """The message, its tensors copied out of `ring` (the caller then releases the ring)."""
    return _RingUnpickler(io.BytesIO(payload), ring).load()
