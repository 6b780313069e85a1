"""Serialising an ExplainResponse with a single copy of its heatmap and overlay bytes.

A heatmap at a photo's size is tens of megabytes, and protobuf's Python API copies a bytes field
when it is assigned and again when the message is serialised. Here the answer is written as wire
format directly: every small part (ids, predictions, a heatmap's method and scores, a tensor's
dtype and shape) is serialised by protobuf itself, and this module writes only the framing (key
and length) of the length-delimited fields that hold large bytes: `results`, `heatmaps`, a
heatmap's `data` Tensor, that tensor's `data` bytes and `overlay_png`; an image's feature maps and
gate values follow the overlay as protobuf serialises them. The whole answer is then
joined once.

Every message occurs exactly once and its fields come in field-number order, so the bytes equal
protobuf's own deterministic serialisation of the same message (tests/server/test_wire.py checks
it, and tests/server/test_wire_conformance.py walks real answers). No decoder has to merge a
repeated occurrence of a singular field, a corner of the specification that some decoders
(protobuf.js among them) implement by replacing the first occurrence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from camserve.v1 import explain_pb2 as pb

_LENGTH_DELIMITED = 2
_RESULTS = pb.ExplainResponse.DESCRIPTOR.fields_by_name["results"].number
_HEATMAPS = pb.ImageResult.DESCRIPTOR.fields_by_name["heatmaps"].number
_OVERLAY_PNG = pb.ImageResult.DESCRIPTOR.fields_by_name["overlay_png"].number
_HEATMAP_DATA = pb.Heatmap.DESCRIPTOR.fields_by_name["data"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number

Chunk = bytes | memoryview


class HeatmapPart(NamedTuple):
    """A heatmap in pieces: `head` holds its fields numbered below `data`, `tail` those above;
    `tensor` is `data` without its bytes (dtype and shape), and `payload` those bytes."""

    head: pb.Heatmap
    tensor: pb.Tensor
    payload: memoryview
    tail: pb.Heatmap


class ImagePart(NamedTuple):
    """An ImageResult in pieces: `head` holds only its predictions (the field numbered before
    `heatmaps`); the heatmaps and the overlay PNG follow, in field order, then `tail` with the
    fields numbered after the overlay (feature maps and gate values, serialised by protobuf:
    a few selected channels, far smaller than photo-sized heatmaps)."""

    head: pb.ImageResult
    heatmaps: Sequence[HeatmapPart]
    overlay_png: bytes
    tail: pb.ImageResult | None = None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _size(chunks: Sequence[Chunk]) -> int:
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)


def _field(number: int, chunks: list[Chunk]) -> list[Chunk]:
    """A length-delimited field holding `chunks`: its key and length, then the chunks."""
    key = _varint(number << 3 | _LENGTH_DELIMITED)
    return [key + _varint(_size(chunks)), *chunks]


def _bytes_field(number: int, data: Chunk) -> list[Chunk]:
    """A bytes field; proto3 writes none for empty bytes, and neither does this."""
    return _field(number, [data]) if _size([data]) else []


def _heatmap(part: HeatmapPart) -> list[Chunk]:
    tensor = [part.tensor.SerializeToString(), *_bytes_field(_TENSOR_DATA, part.payload)]
    inner = [part.head.SerializeToString(), *_field(_HEATMAP_DATA, tensor)]
    return _field(_HEATMAPS, [*inner, part.tail.SerializeToString()])


def _image(part: ImagePart) -> list[Chunk]:
    inner: list[Chunk] = [part.head.SerializeToString()]
    for heatmap in part.heatmaps:
        inner += _heatmap(heatmap)
    inner += _bytes_field(_OVERLAY_PNG, part.overlay_png)
    if part.tail is not None:
        inner.append(part.tail.SerializeToString())
    return _field(_RESULTS, inner)


def serialise(
    head: pb.ExplainResponse, images: Sequence[ImagePart], tail: pb.ExplainResponse
) -> bytes:
    """The bytes of one ExplainResponse: `head` holds its fields numbered below `results`, then
    come `images` as its results, then `tail` with the fields numbered above."""
    chunks: list[Chunk] = [head.SerializeToString()]
    for image in images:
        chunks += _image(image)
    chunks.append(tail.SerializeToString())
    return b"".join(chunks)
