"""Refusals as HTTP answers: one table from domain errors to HTTP statuses, one JSON shape.

Every error body is `{"code": <HTTP status>, "status": <gRPC status name>, "message": ...}`
(plus `retry_after_s` when a retry is suggested), with the message the gRPC API gives for the
same refusal, so callers of either protocol read the same words.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from camserve.server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    ServerFault,
    ServiceError,
    Unavailable,
)
from camserve.server.servicer import status_code

HTTP_STATUSES: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    ModelNotFound: 404,
    Overloaded: 429,
    ServerFault: 500,
    Unavailable: 503,
    OutOfMemory: 503,  # the device, not the caller's rate: retry later or send less
    DeadlineExceeded: 504,
}
# gRPC status names of the refusals only HTTP makes (the others come from the servicer's table).
HTTP_ONLY_STATUS_NAMES = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
}


class BodyTooLarge(InvalidRequest):
    """A request body over the server's message size limit (HTTP 413)."""


class UnsupportedBody(InvalidRequest):
    """A request body of a content type the endpoint does not read (HTTP 415)."""


class Unauthenticated(ServiceError):
    """A call without the configured bearer token (HTTP 401)."""


_OWN_STATUSES: dict[type[ServiceError], int] = {
    BodyTooLarge: 413,
    UnsupportedBody: 415,
    Unauthenticated: 401,
}


def http_status(error: ServiceError) -> int:
    """The HTTP status of a domain error (its nearest class in the tables)."""
    for kind in type(error).__mro__:
        if kind in _OWN_STATUSES:
            return _OWN_STATUSES[kind]
        if kind in HTTP_STATUSES:
            return HTTP_STATUSES[kind]
    return 500


def json_error(
    status: int, status_name: str, message: str, retry_after_s: float = 0.0
) -> web.Response:
    """An error answer in the API's JSON shape; a retry hint also becomes `Retry-After`."""
    body: dict[str, object] = {"code": status, "status": status_name, "message": message}
    headers = {}
    if retry_after_s > 0:
        body["retry_after_s"] = retry_after_s
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))  # whole seconds only
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="camserve"'
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def service_error_response(error: ServiceError) -> web.Response:
    """The answer to a request refused with `error`."""
    status = http_status(error)
    name = HTTP_ONLY_STATUS_NAMES.get(status) if status in (401, 413, 415) else None
    return json_error(status, name or status_code(error).name, error.message, error.retry_after_s)
