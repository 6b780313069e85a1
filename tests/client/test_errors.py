"""Translation of gRPC failures into the client's exceptions, from hand-made failed calls."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from camserve.client import errors
from camserve.client.errors import (
    CamserveError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServerError,
    Unauthenticated,
    Unavailable,
)


class FailedCall(grpc.RpcError):
    """What a failed unary call raises: an RpcError that is also a finished Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing


def rich_status(code: grpc.StatusCode, message: str, *details) -> tuple[tuple[str, bytes], ...]:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, InvalidArgument),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, Unauthenticated),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNKNOWN, ServerError),
        (grpc.StatusCode.CANCELLED, ServerError),
    ],
)
def test_each_code_maps_to_its_class_with_code_and_message(code, expected) -> None:
    error = errors.from_rpc_error(FailedCall(code, "the server's words"))
    assert type(error) is expected
    assert isinstance(error, CamserveError)
    assert error.code is code
    assert error.message == "the server's words"
    assert str(error) == f"{code.name}: the server's words"


def test_retry_info_in_the_rich_status_becomes_retry_after() -> None:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=1, nanos=250_000_000)
    )
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    call = FailedCall(code, "queue full", rich_status(code, "queue full", info))
    error = errors.from_rpc_error(call)
    assert isinstance(error, Overloaded)
    assert error.retry_after == pytest.approx(1.25)


def test_overloaded_without_a_hint_has_no_retry_after() -> None:
    error = errors.from_rpc_error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    assert isinstance(error, Overloaded)
    assert error.retry_after is None


def test_a_rich_status_that_disagrees_with_the_call_is_ignored() -> None:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
    trailing = rich_status(grpc.StatusCode.INTERNAL, "other", info)
    error = errors.from_rpc_error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailing))
    assert isinstance(error, Overloaded)
    assert error.retry_after is None


def test_other_details_are_skipped() -> None:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = rich_status(
        code,
        "full",
        error_details_pb2.ErrorInfo(reason="QUEUE"),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000)),
    )
    error = errors.from_rpc_error(FailedCall(code, "full", trailing))
    assert isinstance(error, Overloaded)
    assert error.retry_after == pytest.approx(0.5)


def test_stream_errors_map_like_statuses() -> None:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    error = errors.from_stream_error(code, "queue full", 0.2)
    assert isinstance(error, Overloaded)
    assert error.retry_after == pytest.approx(0.2)
    assert error.message == "queue full"
    unknown = errors.from_stream_error(999, "", 0.0)
    assert type(unknown) is ServerError
    assert unknown.code is grpc.StatusCode.UNKNOWN
    assert unknown.message == "UNKNOWN"


def test_a_bare_rpc_error_becomes_unknown() -> None:
    error = errors.from_rpc_error(grpc.RpcError("connection reset"))
    assert type(error) is ServerError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert error.message == "connection reset"
