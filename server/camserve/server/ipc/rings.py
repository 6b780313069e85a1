"""A single-producer, single-consumer byte ring in one POSIX shared-memory segment.

Each frontend owns two (pixels to the engine, maps back), created once by the supervisor, so
no message creates a segment. The producer carves tensors out of the ring in order; the
consumer copies a message's tensors out as soon as the message arrives and then publishes how
far it has read, which is all the producer waits on. The positions only grow; a tensor that
would straddle the end starts again at the front, and so does every message sent once the
consumer has read all before it (the usual case), so the bytes crossing stay in a few cached
MiB at the front rather than cycling through the whole ring.
"""

from __future__ import annotations

import contextlib
from multiprocessing import shared_memory

import numpy as np
import torch

HEADER_BYTES = 64  # the consumer's read position, on its own cache line
ALIGN = 64


class RingFull(Exception):
    """The ring has no room for the tensor now; the producer rolls back and waits."""


def _aligned(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def segment_bytes(ring_mb: int) -> int:
    """The segment size for a ring of `ring_mb` MiB of data."""
    return HEADER_BYTES + ring_mb * 2**20


class ShmRing:
    """One ring over an attached segment; a process uses it either to produce or to consume."""

    def __init__(self, segment: shared_memory.SharedMemory) -> None:
        self.segment = segment
        self.capacity = (segment.size - HEADER_BYTES) // ALIGN * ALIGN
        self._read = np.ndarray((1,), np.uint64, buffer=segment.buf, offset=0)
        self.data = torch.frombuffer(
            segment.buf, dtype=torch.uint8, count=self.capacity, offset=HEADER_BYTES
        )
        self.array = np.ndarray((self.capacity,), np.uint8, buffer=segment.buf, offset=HEADER_BYTES)
        self.written = 0  # the producer's position
        self._skipped = 0  # where the producer last started again at the front

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        return cls(shared_memory.SharedMemory(name=name))

    def reset(self) -> None:
        """Empties the ring; only while no peer uses it (before a new connection's hello)."""
        self.written = 0
        self._skipped = 0
        self._read[0] = 0

    @property
    def released(self) -> int:
        return int(self._read[0])

    def idle(self) -> bool:
        """Whether the consumer has read everything produced."""
        return self.released >= self.written

    def alloc(self, nbytes: int) -> int:
        """The data offset of `nbytes` of fresh room; RingFull when the consumer lags."""
        size = _aligned(nbytes)
        position = self.written
        read = max(self.released, self._skipped)
        if position % self.capacity and read >= position:
            # The consumer has read everything: start again at the front, whose memory the last
            # messages left in the CPU caches. Cycling through the whole ring writes to memory
            # they no longer hold (one 600 KB input: 120 us against 46).
            position += self.capacity - position % self.capacity
            # The bytes skipped were never written: free for this message's other tensors too,
            # before the consumer publishes a position past them.
            self._skipped = read = position
        offset = position % self.capacity
        if offset + size > self.capacity:  # never straddle the end
            position += self.capacity - offset
            offset = 0
        if position + size - read > self.capacity:
            raise RingFull(nbytes)
        self.written = position + size
        return offset

    def release(self, position: int) -> None:
        """Publishes that everything before `position` has been copied out."""
        self._read[0] = position

    def close(self) -> None:
        """Drops this process's mapping (views first, or the segment stays exported)."""
        del self.data, self.array, self._read
        # A view still alive somewhere keeps the mapping, which then goes with the process.
        with contextlib.suppress(BufferError):
            self.segment.close()
