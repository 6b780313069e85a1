"""The shared-memory rings and the codec the engine and frontend processes talk through."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import weakref
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from camserve.server.errors import Overloaded
from camserve.server.ipc.codec import dumps, loads
from camserve.server.ipc.rings import ALIGN, RingFull, ShmRing, segment_bytes


@pytest.fixture
def ring() -> Iterator[ShmRing]:
    """A 1 MiB ring; the producer and consumer are the same object here, as in the tests of a
    pipe's two ends in one process."""
    segment = shared_memory.SharedMemory(create=True, size=segment_bytes(1))
    ring = ShmRing(segment)
    yield ring
    ring.close()
    segment.unlink()


@dataclasses.dataclass(frozen=True)
class Result:
    logits: torch.Tensor
    maps: dict[tuple[str, int], torch.Tensor]
    array: np.ndarray
    label: str


def test_a_message_crosses_with_its_tensors_in_the_ring_not_the_pickle(ring: ShmRing) -> None:
    big = torch.arange(200_000, dtype=torch.float32).reshape(2, 100_000)
    message = Result(
        logits=big,
        maps={("gradcam", 3): torch.ones(7, 7, dtype=torch.bfloat16), ("x", 1): torch.empty(0)},
        array=np.arange(12, dtype=np.uint8).reshape(3, 4),
        label="cat",
    )
    payload = dumps(("done", 7, message, Overloaded("queue full", retry_after_s=0.5)), ring)
    assert len(payload) < 2_000  # 800 KB of tensors, a pickle of structure only
    kind, request_id, copy, error = loads(payload, ring)
    assert (kind, request_id, copy.label) == ("done", 7, "cat")
    assert torch.equal(copy.logits, big)
    assert copy.maps[("gradcam", 3)].dtype == torch.bfloat16
    assert torch.equal(copy.maps[("gradcam", 3)], torch.ones(7, 7, dtype=torch.bfloat16))
    assert copy.maps[("x", 1)].shape == (0,)
    np.testing.assert_array_equal(copy.array, message.array)
    assert isinstance(error, Overloaded)
    assert error.retry_after_s == 0.5  # domain errors keep their retry hint
    ring.release(ring.written)
    ring.data.fill_(0)  # the copies do not share the ring's memory
    assert torch.equal(copy.logits, big)


def test_non_contiguous_tensors_cross_as_their_values(ring: ShmRing) -> None:
    base = torch.arange(24, dtype=torch.int64).reshape(4, 6)
    view = base.t()[1:, ::2]
    copy = loads(dumps(view, ring), ring)
    assert torch.equal(copy, view)


def test_permuted_tensors_cross_in_their_memory_layout(ring: ShmRing) -> None:
    """Decoded pixels are (3, H, W) views of (H, W, 3) memory: they cross with those strides,
    so the engine stacks them without a transposing copy."""
    by_pixel = torch.arange(5 * 7 * 3, dtype=torch.uint8).reshape(5, 7, 3)
    pixels = by_pixel.permute(2, 0, 1)
    broadcast = torch.ones(3, 1).expand(3, 4)  # not dense: crosses as its values
    copy, expanded = loads(dumps((pixels, broadcast), ring), ring)
    assert torch.equal(copy, pixels)
    assert copy.stride() == pixels.stride()
    assert copy.permute(1, 2, 0).is_contiguous()
    assert torch.equal(expanded, broadcast)


def test_every_dtype_and_object_arrays_cross(ring: ShmRing) -> None:
    """Dtypes numpy lacks go through torch; numpy arrays of objects are pickled as usual."""
    tensors = [
        torch.arange(6, dtype=dtype).reshape(2, 3)
        for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int32)
    ]
    flags = torch.tensor([True, False])
    objects = np.array(["cat", None], dtype=object)
    *copies, flags_copy, objects_copy = loads(dumps((*tensors, flags, objects), ring), ring)
    for copy, tensor in zip(copies, tensors, strict=True):
        assert copy.dtype == tensor.dtype
        assert torch.equal(copy, tensor)
    assert torch.equal(flags_copy, flags)
    assert objects_copy.tolist() == ["cat", None]


def test_messages_are_freed_once_sent_and_once_read(ring: ShmRing) -> None:
    """No reference cycle through the codec: a sent message, and a received one, go as soon
    as nothing else holds them (the garbage collector is off here)."""
    gc.disable()
    try:
        pixels = torch.zeros(3, 8, 8)
        sent = weakref.ref(pixels)
        payload = dumps(("explain", [pixels]), ring)
        del pixels
        assert sent() is None
        _, (received,) = loads(payload, ring)
        read = weakref.ref(received)
        del received
        assert read() is None
    finally:
        gc.enable()


def test_a_plain_unpickler_refuses_a_ring_message(ring: ShmRing) -> None:
    payload = dumps(("done", torch.ones(2)), ring)
    with pytest.raises(pickle.UnpicklingError, match="codec.loads"):
        pickle.loads(payload)  # noqa: S301 - this test's own bytes


def test_the_producer_waits_for_the_consumer_and_wraps_around(ring: ShmRing) -> None:
    quarter = ring.capacity // 4 // ALIGN * ALIGN
    assert [ring.alloc(quarter) for _ in range(3)] == [0, quarter, 2 * quarter]
    with pytest.raises(RingFull):
        ring.alloc(2 * quarter)  # the tail holds one quarter; the front is not read yet
    ring.release(ring.written)  # the consumer has copied everything out
    assert ring.alloc(2 * quarter) == 0  # would straddle the end: starts at the front
    with pytest.raises(RingFull):
        ring.alloc(ring.capacity)  # more than the room left


def test_once_the_consumer_has_read_everything_the_producer_starts_at_the_front(
    ring: ShmRing,
) -> None:
    """The bytes crossing stay in the ring's first, cached, bytes rather than cycling through
    all of it: each message starts at the front when the one before has been read."""
    assert ring.alloc(100) == 0
    assert ring.alloc(100) == ALIGN * 2  # the first is not read yet: the next one follows it
    ring.release(ring.written)
    assert ring.alloc(100) == 0
    ring.release(ring.written - 1)  # not quite everything
    assert ring.alloc(100) == ALIGN * 2
    ring.release(ring.written)
    mark = ring.written
    assert ring.alloc(100) == 0
    ring.written = mark  # a sender rolling back a message that did not fit
    assert ring.alloc(ring.capacity) == 0  # the whole ring is free again
    ring.release(ring.written)
    assert ring.alloc(ALIGN) == 0
    ring.release(ring.written)
    half = ring.capacity // 2 // ALIGN * ALIGN
    # One message's tensors: the first starts at the front, the rest follow it, in a ring the
    # consumer has not yet read past the bytes the producer skipped.
    assert [ring.alloc(half), ring.alloc(half)] == [0, half]


def test_reset_empties_the_ring(ring: ShmRing) -> None:
    ring.alloc(ring.capacity)
    assert not ring.idle()
    ring.reset()
    assert ring.idle()
    assert ring.alloc(ring.capacity) == 0
