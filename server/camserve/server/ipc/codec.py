"""Pickling control messages whose tensors travel through a shared-memory ring.

`dumps` pickles a message (a tuple of dataclasses, dicts, exceptions...) but writes every torch
tensor and numeric numpy array into the ring, leaving only (dtype, shape, offset) in the pickle;
`loads` copies them back out. So a message's bytes on the socket are its structure alone,
however large its pixels or maps, and the ring is free again as soon as `loads` returns.

Tensors are found through the pickler's `dispatch_table`, a lookup by exact type that pickle
makes in C, rather than `persistent_id`, which pickle calls in Python for every object: a
request's answer holds about 70 objects and 3 tensors, and asking about each cost more than
the rest of its pickling (about 100 us against 10). Their bytes move through numpy where it
has the dtype: its slicing and copies cost a few microseconds against about ten for the same
torch calls (bfloat16 goes through torch).
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
from typing import Any, NoReturn

import numpy as np
import torch

from camserve.server.ipc.rings import ShmRing

_NUMERIC_KINDS = frozenset("biufc")
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    dtype: np.dtype(name)
    for dtype, name in (
        (torch.float32, "float32"),
        (torch.float64, "float64"),
        (torch.float16, "float16"),
        (torch.int64, "int64"),
        (torch.int32, "int32"),
        (torch.int16, "int16"),
        (torch.int8, "int8"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
    )
}
# dtypes cross by name: pickling a torch.dtype object costs about 3 us.
_DTYPE_NAMES = {
    dtype: str(dtype).removeprefix("torch.")
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _from_ring(*pid: Any) -> NoReturn:  # noqa: ANN401 - the unpickler's stand-in
    """What a pickled tensor names; only `loads` can rebuild it (its bytes are in the ring)."""
    raise pickle.UnpicklingError("a ring-codec message: read it with codec.loads and its ring")


class _RingPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, ring: ShmRing) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        # Partials, not bound methods: a pickler reachable from its own dispatch table would
        # be a reference cycle, keeping the message alive until the garbage collector ran.
        self.dispatch_table = {
            **copyreg.dispatch_table,
            torch.Tensor: functools.partial(_reduce_tensor, ring),
            np.ndarray: functools.partial(_reduce_array, ring),
        }


def _reduce_tensor(ring: ShmRing, tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    return _from_ring, _put_tensor(ring, tensor)


def _reduce_array(ring: ShmRing, array: np.ndarray) -> Any:  # noqa: ANN401 - a reduce value
    if array.dtype.kind not in _NUMERIC_KINDS:
        return array.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return _from_ring, _put_array(ring, array)


class _RingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, ring: ShmRing) -> None:
        super().__init__(file)
        # A partial, not a bound method, for the same reason as the pickler's table: the memo
        # holds it, and through a cycle every tensor loaded would wait for the collector
        # (measured: 600 KB float inputs took 280 us to load instead of 30).
        self._take = functools.partial(_take, ring)

    def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401 - pickle's own hook
        if module == __name__ and name == "_from_ring":
            return self._take
        return super().find_class(module, name)


def _take(  # noqa: PLR0913 - the ring, then the fields of a pickled tensor
    ring: ShmRing,
    kind: str,
    dtype: str,
    shape: tuple[int, ...],
    offset: int,
    nbytes: int,
    dims: tuple[int, ...] | None,
) -> torch.Tensor | np.ndarray:
    """A copy of the tensor or array at `offset`, with the sender's strides."""
    if kind == "t":
        return _take_tensor(ring, _DTYPES[dtype], shape, offset, nbytes, dims)
    if not nbytes:
        return np.empty(shape, dtype=dtype)
    raw_array = ring.array[offset : offset + nbytes]
    return raw_array.view(dtype).reshape(shape).copy()


def _take_tensor(  # noqa: PLR0913 - as _take
    ring: ShmRing,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    offset: int,
    nbytes: int,
    dims: tuple[int, ...] | None,
) -> torch.Tensor:
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    dense_shape = shape if dims is None else tuple(shape[d] for d in dims)
    as_numpy = _NUMPY_DTYPES.get(dtype)
    if as_numpy is not None:
        raw_bytes = ring.array[offset : offset + nbytes]
        dense = torch.from_numpy(raw_bytes.view(as_numpy).reshape(dense_shape).copy())
    else:
        dense = ring.data[offset : offset + nbytes].view(dtype).view(dense_shape).clone()
    # A permuted view of the dense copy has the sender's strides.
    return dense if dims is None else dense.permute(_inverse(dims))


def _put_tensor(ring: ShmRing, tensor: torch.Tensor) -> tuple[Any, ...]:
    """Writes the tensor's elements into the ring; a permutation of a contiguous tensor (such as
    (3, H, W) pixels over (H, W, 3) memory) is written in its memory order and read back with
    the same strides, so neither side makes a transposing copy."""
    tensor = tensor.detach()
    nbytes = tensor.numel() * tensor.element_size()
    shape = tuple(tensor.shape)
    dtype = _DTYPE_NAMES[tensor.dtype]
    if not nbytes:
        return ("t", dtype, shape, 0, 0, None)
    offset = ring.alloc(nbytes)
    dims = _memory_order(tensor)
    dense = tensor if dims is None else tensor.permute(dims)
    as_numpy = _NUMPY_DTYPES.get(tensor.dtype)
    if as_numpy is not None and tensor.device.type == "cpu":
        room = ring.array[offset : offset + nbytes].view(as_numpy).reshape(dense.shape)
        room[...] = dense.numpy()
    else:
        ring.data[offset : offset + nbytes].view(tensor.dtype).view(dense.shape).copy_(dense)
    return ("t", dtype, shape, offset, nbytes, dims)


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
