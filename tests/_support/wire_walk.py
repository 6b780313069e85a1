"""A strict reader of protobuf wire format, for conformance tests of bytes the server writes.

It walks a serialised message field by field, descending into every message-typed field with that
field's descriptor, and fails when a field is unknown, has a wire type its declaration does not
allow, occurs more than once although it is singular, or comes out of field-number order. What it
accepts, every conforming protobuf decoder reads the same way, whether it merges a repeated
singular message field (Python, C++) or replaces it (protobuf.js).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
_FIXED64_TYPES = {
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_FIXED32_TYPES = {
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}
_DELIMITED_TYPES = {
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BYTES,
    FieldDescriptor.TYPE_MESSAGE,
}


class WireViolation(AssertionError):
    """Bytes that a conforming decoder might read differently from protobuf's Python runtime."""


@dataclass
class WalkReport:
    """What a walk saw: how many occurrences of each message field path (for the test to check
    that the cases it meant to cover were really there)."""

    paths: Counter[str] = field(default_factory=Counter)


def _varint(data: bytes | memoryview, pos: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireViolation(f"{where}: truncated or overlong varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _wire_type_of(descriptor: FieldDescriptor) -> int:
    if descriptor.type in _DELIMITED_TYPES:
        return LENGTH_DELIMITED
    if descriptor.is_repeated and descriptor.is_packed:
        return LENGTH_DELIMITED
    if descriptor.type in _FIXED64_TYPES:
        return FIXED64
    if descriptor.type in _FIXED32_TYPES:
        return FIXED32
    return VARINT


def _value(data: memoryview, pos: int, wire_type: int, where: str) -> tuple[memoryview, int]:
    """The field's encoded value and the position after it."""
    if wire_type == VARINT:
        end = _varint(data, pos, where)[1]
    elif wire_type == FIXED64:
        end = pos + 8
    elif wire_type == FIXED32:
        end = pos + 4
    elif wire_type == LENGTH_DELIMITED:
        length, pos = _varint(data, pos, where)
        end = pos + length
    else:
        raise WireViolation(f"{where}: wire type {wire_type} is not used by proto3 fields")
    if end > len(data):
        raise WireViolation(f"{where}: field runs past the end of its message")
    return data[pos:end], end


def walk(data: bytes, descriptor: Descriptor) -> WalkReport:
    """Checks `data` as a serialised `descriptor` message, recursively; raises WireViolation."""
    report = WalkReport()
    _walk(memoryview(data), descriptor, descriptor.name, report)
    return report


def _walk(data: memoryview, descriptor: Descriptor, path: str, report: WalkReport) -> None:
    seen: Counter[int] = Counter()
    last = 0
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos, path)
        number, wire_type = key >> 3, key & 7
        declared = descriptor.fields_by_number.get(number)
        if declared is None:
            raise WireViolation(f"{path}: field number {number} is not in the .proto")
        where = f"{path}.{declared.name}"
        if wire_type != _wire_type_of(declared):
            raise WireViolation(f"{where}: wire type {wire_type}, declared {declared.type}")
        if number < last:
            raise WireViolation(f"{where}: field {number} comes after field {last}")
        last = number
        seen[number] += 1
        if not declared.is_repeated and seen[number] > 1:
            raise WireViolation(f"{where}: singular field occurs {seen[number]} times")
        value, pos = _value(data, pos, wire_type, where)
        report.paths[where] += 1
        if declared.type == FieldDescriptor.TYPE_MESSAGE:
            _walk(value, declared.message_type, where, report)
