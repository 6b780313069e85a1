"""Exceptions raised by the camserve client, and the one place gRPC errors become them.

Our exception hierarchy:

* CamserveError
  + InvalidArgument     - INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE: fix the request
  + NotFound            - NOT_FOUND: unknown model, layer or label
  + Overloaded          - RESOURCE_EXHAUSTED: queue full; `retry_after` holds the server's hint
  + DeadlineExceeded    - DEADLINE_EXCEEDED: the call's timeout ran out
  + Unavailable         - UNAVAILABLE: nothing listening, connection lost, server shutting down
  + Unauthenticated     - UNAUTHENTICATED, PERMISSION_DENIED: missing or wrong bearer token
  + ServerError         - any other code (INTERNAL, UNKNOWN, CANCELLED, ...)

Every one carries the gRPC `code` and the server's `message`. Mistakes in how the client itself is
called (a bad argument value, a closed client) raise the usual ValueError, TypeError or
RuntimeError before anything is sent.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class CamserveError(Exception):
    """A call to the camserve server failed; `code` and `message` come from the server."""

    def __init__(self, message: str, *, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CamserveError):
    """The server refused the request as malformed (bad image, layer, target, option)."""


class NotFound(CamserveError):
    """The named model (or another named thing) does not exist on the server."""


class Overloaded(CamserveError):
    """The server's queue is full; try again after `retry_after` seconds when it says so."""

    def __init__(
        self, message: str, *, code: grpc.StatusCode, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class DeadlineExceeded(CamserveError):
    """The call did not finish within its timeout."""


class Unavailable(CamserveError):
    """The server could not be reached or is going away; usually worth retrying."""


class Unauthenticated(CamserveError):
    """The server wants a (different) bearer token or client certificate."""


class ServerError(CamserveError):
    """Any other failure status, such as INTERNAL."""


_BY_CODE: dict[grpc.StatusCode, type[CamserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def error_for(
    code: grpc.StatusCode, message: str, *, retry_after: float | None = None
) -> CamserveError:
    """The exception for a status `code`; shared by unary calls and per-request stream errors."""
    cls = _BY_CODE.get(code, ServerError)
    if cls is Overloaded:
        return Overloaded(message, code=code, retry_after=retry_after)
    return cls(message, code=code)


def from_rpc_error(exc: grpc.RpcError) -> CamserveError:
    """Translates a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`).

    Both kinds answer `code()`, `details()` and `trailing_metadata()` without awaiting, so one
    function serves the sync and asyncio clients; callers write `raise from_rpc_error(e) from e`.
    """
    code_fn = getattr(exc, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    message = (details_fn() if callable(details_fn) else None) or str(exc) or code.name
    retry_after = _retry_after(exc) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
    return error_for(code, message, retry_after=retry_after)


def from_stream_error(error_code: int, message: str, retry_after_s: float) -> CamserveError:
    """Translates the `Error` message an ExplainStream response carries for one request."""
    code = _CODE_BY_VALUE.get(error_code, grpc.StatusCode.UNKNOWN)
    return error_for(code, message or code.name, retry_after=retry_after_s or None)


def _retry_after(exc: grpc.RpcError) -> float | None:
    """Reads `google.rpc.RetryInfo` from the rich status (`grpc-status-details-bin`) if present."""
    if not callable(getattr(exc, "trailing_metadata", None)):
        return None
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # rich status disagrees with the plain one: ignore the hint
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return max(delay, 0.0)
    return None
