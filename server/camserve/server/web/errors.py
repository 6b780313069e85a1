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
# gRPC status names of the statuses aiohttp answers itself (no such path, wrong method, ...).
HTTP_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
}
# Where an answer keeps its gRPC status name, for the request metrics.
STATUS_NAME_KEY = web.ResponseKey("camserve_status", str)


class BodyTooLarge(InvalidRequest):
    """A request body over the server's message size limit (HTTP 413)."""


class UnsupportedBody(InvalidRequest):
    """A request body of a content type the endpoint does not read (HTTP 415)."""


class Unauthenticated(ServiceError):
    """A call without the configured bearer token (HTTP 401)."""


# The refusals only HTTP makes: their status and gRPC status name.
_HTTP_ONLY: dict[type[ServiceError], tuple[int, str]] = {
    BodyTooLarge: (413, "INVALID_ARGUMENT"),
    UnsupportedBody: (415, "INVALID_ARGUMENT"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
}


def http_status(error: ServiceError) -> tuple[int, str]:
    """The HTTP status and gRPC status name of a domain error (its nearest class)."""
    for kind in type(error).__mro__:
        if kind in _HTTP_ONLY:
            return _HTTP_ONLY[kind]
        if kind in HTTP_STATUSES:
            return HTTP_STATUSES[kind], status_code(error).name
    return 500, "INTERNAL"


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
    response = web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )
    response[STATUS_NAME_KEY] = status_name
    return response


def service_error_response(error: ServiceError) -> web.Response:
    """The answer to a request refused with `error`."""
    status, name = http_status(error)
    return json_error(status, name, error.message, error.retry_after_s)
