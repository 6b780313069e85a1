"""camserve.v1 messages as JSON: protobuf's JSON mapping, with the .proto's field names.

An ExplainResponse carries its heatmaps as tensor bytes, which the mapping writes as base64
strings. Encoding those through `json_format` and `json.dumps` copies each map four times and
scans every base64 character for escaping, although base64 never needs any. So the answer is
converted with its tensor bytes taken out, and each heatmap's base64 text is spliced in where a
placeholder stood: the same bytes `json.dumps(MessageToDict(...))` writes, with one copy
(tests/web/test_encoding.py checks them equal).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from camserve.v1 import explain_pb2 as pb

SEPARATORS = (",", ":")


def to_json(message: Message) -> bytes:
    """A message in protobuf's JSON mapping with the .proto's field names, compact."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=SEPARATORS).encode()


def response_json(response: pb.ExplainResponse) -> bytes:
    """`to_json(response)`, its tensor bytes base64-encoded once and spliced in (this empties
    the heatmaps' `data.data` of `response`)."""
    payloads: list[bytes] = []
    for result in response.results:
        for heatmap in result.heatmaps:
            payloads.append(heatmap.data.data)
            heatmap.data.ClearField("data")
    as_dict = json_format.MessageToDict(response, preserving_proto_field_name=True)
    marker = f"tensor-{uuid.uuid4().hex}"  # unique per answer: no label can hold it
    tensors = [
        heatmap.get("data", {})
        for result in as_dict.get("results", [])
        for heatmap in result.get("heatmaps", [])
    ]
    spliced = [payload for payload in payloads if payload]
    for tensor, payload in zip(tensors, payloads, strict=True):
        if payload:
            tensor["data"] = marker  # data is the Tensor's last field: the mapping's order
    parts = json.dumps(as_dict, separators=SEPARATORS).encode().split(f'"{marker}"'.encode())
    chunks: list[Any] = [parts[0]]
    for payload, after in zip(spliced, parts[1:], strict=True):
        chunks += [b'"', base64.b64encode(payload), b'"', after]
    return b"".join(chunks)
