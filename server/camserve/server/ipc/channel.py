"""One direction of a frontend-engine connection: control frames on the socket, tensor bytes
in the sender's ring.

A frame is the ring position after its tensors (8 bytes) and the message's pickle; the
receiver copies the tensors out and releases the ring up to that position before it handles
the message, so the ring never holds more than the messages in flight on the socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from camserve.server.ipc.codec import dumps, loads
from camserve.server.ipc.frames import write_frame
from camserve.server.ipc.rings import RingFull, ShmRing

_POSITION_BYTES = 8
_WAIT_S = 0.0005


class MessageTooLarge(Exception):
    """A message's tensors do not fit in the ring even when it is empty."""

    def __init__(self, capacity: int) -> None:
        super().__init__(
            f"its tensors need more than the {capacity / 2**20:.0f} MiB shared-memory ring "
            "between the server's processes"
        )
        self.capacity = capacity


class RingSender:
    """Sends messages over `writer`, their tensors through `ring` (this side produces)."""

    def __init__(self, writer: asyncio.StreamWriter, ring: ShmRing) -> None:
        self._writer = writer
        self._ring = ring

    async def send(self, message: object) -> None:
        """Writes `message`, waiting while the receiver still holds the room it needs."""
        ring = self._ring
        while True:
            if self._writer.is_closing():
                raise ConnectionResetError("the peer process went away")
            mark = ring.written
            try:
                payload = dumps(message, ring)
            except RingFull:
                ring.written = mark  # nothing of this message was published
                if ring.released >= mark:
                    raise MessageTooLarge(ring.capacity) from None
                await asyncio.sleep(_WAIT_S)
                continue
            write_frame(self._writer, ring.written.to_bytes(_POSITION_BYTES, "little") + payload)
            return


def receive(frame: bytes, ring: ShmRing) -> Any:  # noqa: ANN401 - whatever was sent
    """The frame's message with its tensors copied out; the ring is released past them."""
    position = int.from_bytes(frame[:_POSITION_BYTES], "little")
    message = loads(memoryview(frame)[_POSITION_BYTES:], ring)
    ring.release(position)
    return message
