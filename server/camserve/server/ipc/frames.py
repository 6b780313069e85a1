"""Length-prefixed frames over an asyncio stream (a Unix socket between the processes)."""

from __future__ import annotations

import asyncio

_LENGTH_BYTES = 4


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame; IncompleteReadError when the peer went away."""
    header = await reader.readexactly(_LENGTH_BYTES)
    return await reader.readexactly(int.from_bytes(header, "little"))


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Queues one frame (the transport buffers it; no await on the hot path)."""
    writer.write(len(payload).to_bytes(_LENGTH_BYTES, "little") + payload)
