"""HTTP request bodies to camserve.v1 ExplainRequest messages, bounded before they are read.

Two bodies are accepted. `application/json`: the ExplainRequest in protobuf's JSON mapping
(`json_format`; the .proto's field names or their lowerCamelCase forms, bytes as base64).
`multipart/form-data`: each `image` file field is one image, and every other field is an
ExplainRequest field named by its path (`methods`, `output.scores`, `target.top_k`: `target.*`
applies to every image), repeatable where the field is. Form values are text; each is converted
by its field's type, and an enum accepts its full name (`METHOD_LAYERCAM`) or the part after the
prefix in any case (`layercam`, `input`, `deletion_auc`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import cast

import aiohttp
from aiohttp import BodyPartReader, web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from camserve.server.errors import InvalidRequest
from camserve.server.settings import LimitsSettings
from camserve.server.web.errors import BodyTooLarge, UnsupportedBody
from camserve.v1 import explain_pb2 as pb

IMAGE_FIELD = "image"
MAX_FIELD_BYTES = 64 * 1024  # one option field's text (a list of labels is the longest)
CHUNK = 256 * 1024
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")
_INTEGERS = (
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
)
_FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
# Form field roots: the request's own fields, and `target` for every image's Target.
_ROOTS: dict[str, Descriptor] = {
    "": cast("Descriptor", pb.ExplainRequest.DESCRIPTOR),
    "target": cast("Descriptor", pb.Target.DESCRIPTOR),
}


def check_length(request: web.Request, max_bytes: int) -> None:
    """Refuses a body whose declared length is over the limit before any of it is read."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(request.content_length, max_bytes)


def _over_limit(used: int, max_bytes: int, size: int) -> BodyTooLarge:
    """The refusal of a part of `size` bytes read after `used` bytes of the body."""
    return too_large(used + size, max_bytes)


def too_large(size: int, max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"request body: {size} bytes is over the server's limit of {max_bytes} bytes "
        f"({max_bytes // 2**20} MiB, server.max_message_mb); send fewer or smaller images"
    )


async def explain_request(
    request: web.Request, model: str, limits: LimitsSettings, max_bytes: int
) -> pb.ExplainRequest:
    """The ExplainRequest a POST to `/v1/models/{model}:explain` carries."""
    check_length(request, max_bytes)
    if request.content_type == "application/json":
        message = _from_json(await _read_all(request, max_bytes))
    elif request.content_type == "multipart/form-data":
        message = await _from_form(request, limits, max_bytes)
    else:
        raise UnsupportedBody(
            f"request body: content type {request.content_type or 'none'!r} is not read here; "
            "send application/json (an ExplainRequest in protobuf's JSON mapping) or "
            "multipart/form-data (file fields 'image' and option fields)"
        )
    if message.model and message.model != model:
        raise InvalidRequest(
            f"model: the body names {message.model!r} but the path names {model!r}; name one "
            "model, in the path"
        )
    message.model = model
    return message


async def _read_all(request: web.Request, max_bytes: int) -> bytes:
    data = bytearray()
    while chunk := await request.content.read(CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
    return bytes(data)


def _from_json(body: bytes) -> pb.ExplainRequest:
    try:
        return json_format.Parse(body, pb.ExplainRequest())
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"request body: not an ExplainRequest in protobuf's JSON mapping ({exc}); see "
            "/openapi.json, or camserve/v1/explain.proto for the fields"
        ) from None


async def _read_part(
    part: BodyPartReader, limit: int, refusal: Callable[[int], InvalidRequest]
) -> bytes:
    """A part's bytes, refused with `refusal(bytes read)` as soon as they pass `limit`."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > limit:
            raise refusal(len(data))
    return bytes(data)


async def _read_field(part: BodyPartReader, budget: int, max_bytes: int) -> str:
    """An option field's text: at most MAX_FIELD_BYTES, and within what is left of the body's
    limit (`budget`)."""
    name = part.name or ""

    def refusal(size: int) -> InvalidRequest:
        if size > MAX_FIELD_BYTES:
            return InvalidRequest(
                f"form field {name!r}: over {MAX_FIELD_BYTES} bytes; option fields are short text"
            )
        return _over_limit(max_bytes - budget, max_bytes, size)

    data = await _read_part(part, min(budget, MAX_FIELD_BYTES), refusal)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"form field {name!r}: not UTF-8 text") from None


async def _from_form(
    request: web.Request, limits: LimitsSettings, max_bytes: int
) -> pb.ExplainRequest:
    try:
        return await _read_form(request, limits, max_bytes)
    except (ValueError, KeyError, aiohttp.ClientPayloadError) as exc:
        raise InvalidRequest(
            f"request body: not a readable multipart form ({type(exc).__name__}: {exc}); send "
            "multipart/form-data with a boundary, as curl -F or a browser's FormData do"
        ) from None


async def _read_form(
    request: web.Request, limits: LimitsSettings, max_bytes: int
) -> pb.ExplainRequest:
    images: list[bytes] = []
    fields: dict[str, list[str]] = {}
    budget = max_bytes
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("request body: nested multipart parts are not read; flatten them")
        name = part.name or ""
        if name == IMAGE_FIELD:
            if len(images) == limits.max_images_per_request:
                raise InvalidRequest(
                    f"images: more than the limit of {limits.max_images_per_request} per "
                    "request; split the images over several requests"
                )
            refusal = functools.partial(_over_limit, max_bytes - budget, max_bytes)
            images.append(await _read_part(part, budget, refusal))
            budget -= len(images[-1])
        else:
            text = await _read_field(part, budget, max_bytes)
            budget -= len(text.encode())
            fields.setdefault(name, []).append(text)
    return form_request(images, fields)


def form_request(images: list[bytes], fields: Mapping[str, list[str]]) -> pb.ExplainRequest:
    """The ExplainRequest of a form: its image files and its option fields."""
    values: dict[str, dict[str, object]] = {root: {} for root in _ROOTS}
    for path, texts in fields.items():
        root, _, rest = path.partition(".") if path.startswith("target.") else ("", "", path)
        _set_path(values[root], _ROOTS[root], rest, path, texts)
    try:
        message = json_format.ParseDict(values[""], pb.ExplainRequest())
        target = json_format.ParseDict(values["target"], pb.Target())
    except json_format.ParseError as exc:
        raise InvalidRequest(f"form fields: {exc}") from None
    for data in images:
        image = message.images.add(encoded=data)
        if values["target"]:
            image.target.CopyFrom(target)
    return message


def _set_path(
    into: dict[str, object], descriptor: Descriptor, path: str, full: str, texts: list[str]
) -> None:
    """Puts a field's converted values at its (dotted) path into a JSON-mapping dict."""
    head, _, rest = path.partition(".")
    field = descriptor.fields_by_name.get(head)
    if field is None or (field.message_type is None) == bool(rest) or head == "images":
        raise InvalidRequest(
            f"form field {full!r} is not an option; use '{IMAGE_FIELD}' for image files and "
            f"these option fields: {', '.join(option_fields())}"
        )
    if rest:
        inner = into.setdefault(head, {})
        assert isinstance(inner, dict)
        assert field.message_type is not None
        _set_path(inner, field.message_type, rest, full, texts)
        return
    converted = [_convert(field, full, text) for text in texts]
    if field.is_repeated:
        into[head] = converted
    elif len(converted) > 1:
        raise InvalidRequest(f"form field {full!r} takes one value, got {len(converted)}")
    else:
        into[head] = converted[0]


def option_fields() -> list[str]:
    """Every option field a form may carry (the request's leaf fields, and `target.*`)."""
    targets = [f"target.{path}" for path in _leaf_paths(_ROOTS["target"])]
    return sorted(_leaf_paths(_ROOTS[""])) + targets


def _leaf_paths(descriptor: Descriptor) -> list[str]:
    paths = []
    for field in descriptor.fields:
        if field.name == "images":
            continue
        if field.message_type is None:
            paths.append(field.name)
        else:
            paths += [f"{field.name}.{leaf}" for leaf in _leaf_paths(field.message_type)]
    return paths


def _convert(field: FieldDescriptor, path: str, text: str) -> object:
    """A form value as the JSON mapping's value of `field`."""
    text = text.strip()
    kind = field.cpp_type
    try:
        if kind == FieldDescriptor.CPPTYPE_BOOL:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind in _INTEGERS:
            return int(text)
        if kind in _FLOATS:
            return float(text)
    except ValueError:
        raise InvalidRequest(
            f"form field {path!r}={text!r}: expected {_kind_name(field)}"
        ) from None
    if kind == FieldDescriptor.CPPTYPE_ENUM and field.enum_type is not None:
        return _enum_name(field.enum_type, path, text)
    return text


def _kind_name(field: FieldDescriptor) -> str:
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return "true or false"
    return "a number" if field.cpp_type in _FLOATS else "an integer"


def _enum_name(enum: EnumDescriptor, path: str, text: str) -> str:
    """The enum value name `text` means: the full name, or the part after the common prefix
    (underscores optional), in any case."""
    prefix = enum.values[0].name.rsplit("_", 1)[0] + "_"  # METHOD_UNSPECIFIED -> METHOD_
    wanted = text.upper().replace("-", "_")
    for value in enum.values:
        short = value.name.removeprefix(prefix)
        if wanted in (value.name, short) or wanted.replace("_", "") == short.replace("_", ""):
            return value.name
    names = [v.name.removeprefix(prefix).lower() for v in enum.values[1:]]
    raise InvalidRequest(f"form field {path!r}={text!r}: use one of {', '.join(names)}")


KERNEL_QUERY_EXTRA = ("format",)  # the answer's form (json or png), not a request field


def kernels_request(model: str, query: Mapping[str, str]) -> pb.GetKernelsRequest:
    """The GetKernelsRequest of a kernels URL: each query parameter is one of its fields."""
    descriptor = cast("Descriptor", pb.GetKernelsRequest.DESCRIPTOR)
    values: dict[str, object] = {"model": model}
    for name, text in query.items():
        if name in KERNEL_QUERY_EXTRA:
            continue
        field = descriptor.fields_by_name.get(name)
        if field is None or name == "model":
            allowed = [f.name for f in descriptor.fields if f.name != "model"]
            raise InvalidRequest(
                f"query parameter {name!r} is not one of {', '.join(allowed)} or format=json|png"
            )
        values[name] = _convert(field, name, text)
    if query.get("format", "json") not in ("json", "png"):
        raise InvalidRequest(f"format={query['format']!r}: use json (default) or png")
    try:
        return json_format.ParseDict(values, pb.GetKernelsRequest())
    except json_format.ParseError as exc:
        raise InvalidRequest(f"query parameters: {exc}") from None
