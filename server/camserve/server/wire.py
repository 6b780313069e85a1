"""Serialising an ExplainResponse with a single copy of its heatmap bytes.

A heatmap at a photo's size is tens of megabytes, and protobuf's Python API copies a bytes field
when it is assigned and again when the message is serialised. Here each heatmap's bytes are
instead appended as wire-format fields around the serialised rest of the message, and the whole
answer is joined once. This relies on two rules of the protobuf wire format: fields may come in
any order, and a singular message field that occurs twice is merged, so a `Heatmap` serialised
without its `data.data` followed by a `data` field holding only that `data` parses as the
complete heatmap (tests/server/test_wire.py checks it against protobuf's own serialisation).
"""

from __future__ import annotations

from collections.abc import Sequence

from camserve.v1 import explain_pb2 as pb

_LENGTH_DELIMITED = 2
_RESULTS = pb.ExplainResponse.DESCRIPTOR.fields_by_name["results"].number
_HEATMAPS = pb.ImageResult.DESCRIPTOR.fields_by_name["heatmaps"].number
_HEATMAP_DATA = pb.Heatmap.DESCRIPTOR.fields_by_name["data"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number

Chunk = bytes | memoryview
# A heatmap without its tensor bytes, and those bytes.
HeatmapPart = tuple[pb.Heatmap, memoryview]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header(field: int, length: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint(field << 3 | _LENGTH_DELIMITED) + _varint(length)


def _heatmap(heatmap: pb.Heatmap, payload: memoryview) -> list[Chunk]:
    tensor_data = _header(_TENSOR_DATA, payload.nbytes)
    heatmap_data = _header(_HEATMAP_DATA, len(tensor_data) + payload.nbytes)
    return [heatmap.SerializeToString(), heatmap_data, tensor_data, payload]


def _wrapped(field: int, chunks: list[Chunk]) -> list[Chunk]:
    return [_header(field, sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks))]


def serialise(
    head: pb.ExplainResponse,
    images: Sequence[tuple[pb.ImageResult, Sequence[HeatmapPart]]],
) -> bytes:
    """The bytes of `head` with `images` as its results: each an ImageResult without heatmaps
    and its heatmaps, each without its tensor bytes and those bytes."""
    chunks: list[Chunk] = [head.SerializeToString()]
    for image, heatmaps in images:
        inner: list[Chunk] = [image.SerializeToString()]
        for heatmap, payload in heatmaps:
            parts = _heatmap(heatmap, payload)
            inner += _wrapped(_HEATMAPS, parts) + parts
        chunks += _wrapped(_RESULTS, inner) + inner
    return b"".join(chunks)
