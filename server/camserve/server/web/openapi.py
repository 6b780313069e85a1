"""The OpenAPI 3.1 document of the HTTP API, its schemas derived from camserve/v1's messages.

Schemas follow protobuf's JSON mapping with the .proto's field names (what the API answers):
64-bit integers are strings, bytes are base64 strings, enums are their value names. Deriving
them from the descriptors keeps the document in step with the .proto file.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from camserve.server.web.forms import IMAGE_FIELD, option_fields
from camserve.v1 import explain_pb2 as pb

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.CPPTYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.CPPTYPE_UINT32: {"type": "integer", "format": "uint32"},
    FieldDescriptor.CPPTYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.CPPTYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.CPPTYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.CPPTYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.CPPTYPE_BOOL: {"type": "boolean"},
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "status", "message"],
    "properties": {
        "code": {"type": "integer", "description": "the HTTP status"},
        "status": {"type": "string", "description": "the gRPC status name of the same refusal"},
        "message": {"type": "string", "description": "what was wrong and how to fix it"},
        "retry_after_s": {"type": "number", "description": "suggested wait (also Retry-After)"},
    },
}
_MODEL_PARAMETER = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
ERRORS = {
    "400": "the request is wrong (a field, an image, a layer); the message names it",
    "401": "a bearer token is configured and the call did not send it (Authorization: Bearer)",
    "404": "no such model or path",
    "413": "the body is over the server's message size limit",
    "415": "the body is neither JSON nor a multipart form",
    "429": "the model's queue or the server's request slots are full; see Retry-After",
    "500": "the server failed; not the request's fault",
    "503": "the model is loading or failing, or the server is shutting down",
    "504": "the deadline (X-Timeout-S) passed before the request was computed",
}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None:
        _collect(field.message_type, schemas)
        schema: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
    elif field.enum_type is not None:
        schema = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    elif field.type == FieldDescriptor.TYPE_BYTES:
        schema = {"type": "string", "contentEncoding": "base64"}
    elif field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        schema = {"type": "string"}
    else:
        schema = dict(_SCALARS[field.cpp_type])
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _collect(descriptor: Descriptor, schemas: dict[str, Any]) -> None:
    """Adds the schema of `descriptor` and of every message it holds to `schemas`."""
    if descriptor.name in schemas:
        return
    schemas[descriptor.name] = {}  # placeholder: message types may refer to each other
    properties = {field.name: _field_schema(field, schemas) for field in descriptor.fields}
    schemas[descriptor.name] = {"type": "object", "properties": properties}


def _answers(schema: str, ok: str) -> dict[str, Any]:
    answers: dict[str, Any] = {
        "200": {
            "description": ok,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/HttpError"}}}
    answers.update({code: {"description": text, "content": error} for code, text in ERRORS.items()})
    return answers


def _explain_operation() -> dict[str, Any]:
    form: dict[str, Any] = {
        IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{name: {"type": "string"} for name in option_fields()},
    }
    return {
        "summary": "Explain images (Grad-CAM and its variants) with the named model",
        "parameters": [
            _MODEL_PARAMETER,
            {
                "name": "X-Timeout-S",
                "in": "header",
                "description": "seconds the caller waits; past it the answer is 504",
                "schema": {"type": "number"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ExplainRequest"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": form}},
            },
        },
        "responses": _answers("ExplainResponse", "the explanation of every image"),
    }


def _kernels_operation() -> dict[str, Any]:
    fields = cast("Descriptor", pb.GetKernelsRequest.DESCRIPTOR).fields
    parameters = [
        {"name": f.name, "in": "query", "schema": _scalar(f)} for f in fields if f.name != "model"
    ]
    parameters.append(
        {
            "name": "format",
            "in": "query",
            "description": "json (default): the GetKernelsResponse; png: the grid page itself",
            "schema": {"type": "string", "enum": ["json", "png"]},
        }
    )
    answers = _answers("GetKernelsResponse", "the layer's weights and one page of their grid")
    answers["200"]["content"]["image/png"] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "summary": "A conv layer's weights and their grid (GetKernels)",
        "parameters": [_MODEL_PARAMETER, *parameters],
        "responses": answers,
    }


def _scalar(field: FieldDescriptor) -> dict[str, Any]:
    return {"type": "boolean"} if field.type == FieldDescriptor.TYPE_BOOL else {"type": "integer"}


def document() -> dict[str, Any]:
    """The OpenAPI document served at /openapi.json."""
    schemas: dict[str, Any] = {}
    for message in (
        pb.ExplainRequest,
        pb.ExplainResponse,
        pb.ListModelsResponse,
        pb.ModelInfo,
        pb.GetKernelsResponse,
    ):
        _collect(cast("Descriptor", message.DESCRIPTOR), schemas)
    schemas["HttpError"] = ERROR_SCHEMA
    schemas["Health"] = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]},
            "models": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "camserve", "version": "v1"},
        "paths": {
            "/v1/models": {"get": {"summary": "Hosted models", **_responses("ListModelsResponse")}},
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model: input, labels, layers, methods",
                    "parameters": [_MODEL_PARAMETER],
                    **_responses("ModelInfo"),
                }
            },
            "/v1/models/{model}/kernels": {"get": _kernels_operation()},
            "/v1/models/{model}:explain": {"post": _explain_operation()},
            "/v1/health": {"get": {"summary": "Serving status", **_responses("Health")}},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def _responses(schema: str) -> dict[str, Any]:
    return {"responses": _answers(schema, "OK")}
