"""The explain_many bookkeeping driven by hand: order, bounds, errors, retries."""

from __future__ import annotations

import grpc
import pytest

from camserve.client.errors import InvalidArgument, Overloaded, ServerError
from camserve.client.requests import ExplainOptions
from camserve.client.results import Explanation
from camserve.client.retry import RetryPolicy
from camserve.client.stream import StreamScheduler
from camserve.v1 import explain_pb2 as pb

IMAGES = [f"image-{i}".encode() for i in range(6)]


DEFAULT_RETRY = RetryPolicy()


def scheduler(
    images=IMAGES, *, max_in_flight=2, retry=DEFAULT_RETRY, deadline=None, return_exceptions=True
):
    return StreamScheduler(
        images,
        ExplainOptions(),
        max_in_flight=max_in_flight,
        retry=retry,
        deadline=deadline,
        return_exceptions=return_exceptions,
    )


def ok(request: pb.ExplainRequest) -> pb.ExplainResponse:
    label = request.images[0].encoded.decode()
    result = pb.ImageResult(predictions=[pb.Prediction(index=0, label=label)])
    return pb.ExplainResponse(request_id=request.request_id, results=[result])


def failed(request: pb.ExplainRequest, code: grpc.StatusCode, retry_after_s: float = 0.0):
    error = pb.Error(code=code.value[0], message="no", retry_after_s=retry_after_s)
    return pb.ExplainResponse(request_id=request.request_id, error=error)


def labels(outcomes) -> list[str]:
    return [o.top.label if isinstance(o, Explanation) else type(o).__name__ for o in outcomes]


def test_answers_out_of_order_come_back_in_input_order() -> None:
    stream = scheduler(max_in_flight=3)
    first = stream.to_send(0.0)
    assert [r.images[0].encoded for r in first] == IMAGES[:3]
    assert len({r.request_id for r in first}) == 3
    assert stream.to_send(0.0) == []  # bounded
    stream.on_response(ok(first[2]), 0.0)
    stream.on_response(ok(first[1]), 0.0)
    assert list(stream.ready()) == []  # waiting for input 0
    assert stream.to_send(0.0) == []  # answered but not handed back still counts
    stream.on_response(ok(first[0]), 0.0)
    assert labels(stream.ready()) == ["image-0", "image-1", "image-2"]
    rest = stream.to_send(0.0)
    assert [r.images[0].encoded for r in rest] == IMAGES[3:]
    for request in reversed(rest):
        stream.on_response(ok(request), 0.0)
    assert labels(stream.ready()) == ["image-3", "image-4", "image-5"]
    assert stream.to_send(0.0) == []
    assert stream.finished


def test_inputs_are_read_lazily() -> None:
    taken: list[int] = []

    def images():
        for i, image in enumerate(IMAGES):
            taken.append(i)
            yield image

    stream = scheduler(images(), max_in_flight=2)
    stream.to_send(0.0)
    assert taken == [0, 1]


def test_failed_requests_become_their_exception_in_place() -> None:
    stream = scheduler(IMAGES[:3], max_in_flight=3)
    sent = stream.to_send(0.0)
    stream.on_response(ok(sent[0]), 0.0)
    stream.on_response(failed(sent[1], grpc.StatusCode.INVALID_ARGUMENT), 0.0)
    stream.on_response(ok(sent[2]), 0.0)
    outcomes = list(stream.ready())
    assert labels(outcomes) == ["image-0", "InvalidArgument", "image-2"]
    assert isinstance(outcomes[1], InvalidArgument)
    assert outcomes[1].message == "no"


def test_without_return_exceptions_a_failure_raises_in_its_place() -> None:
    stream = scheduler(IMAGES[:3], max_in_flight=3, return_exceptions=False)
    sent = stream.to_send(0.0)
    stream.on_response(failed(sent[1], grpc.StatusCode.INVALID_ARGUMENT), 0.0)
    stream.on_response(ok(sent[0]), 0.0)
    stream.on_response(ok(sent[2]), 0.0)
    ready = stream.ready()
    assert next(ready).top.label == "image-0"
    with pytest.raises(InvalidArgument, match="no"):
        next(ready)


def test_overloaded_requests_are_sent_again_after_the_hint() -> None:
    stream = scheduler(IMAGES[:1], retry=RetryPolicy(initial_backoff_s=0.01))
    (request,) = stream.to_send(10.0)
    first_id = request.request_id
    stream.on_response(failed(request, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.5), 10.0)
    assert stream.on_wire == 0
    assert list(stream.ready()) == []
    assert 0.5 <= stream.wait_s(10.0) <= 0.75
    assert stream.to_send(10.2) == []  # not yet due
    (again,) = stream.to_send(10.8)
    assert again.request_id != first_id
    assert again.images[0].encoded == IMAGES[0]
    stream.on_response(ok(again), 11.0)
    assert labels(stream.ready()) == ["image-0"]
    assert stream.finished


def test_retries_stop_at_the_policy_or_the_deadline() -> None:
    stream = scheduler(IMAGES[:1], retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    (request,) = stream.to_send(0.0)
    stream.on_response(failed(request, grpc.StatusCode.UNAVAILABLE), 0.0)
    (again,) = stream.to_send(1.0)
    stream.on_response(failed(again, grpc.StatusCode.UNAVAILABLE), 1.0)
    assert labels(stream.ready()) == ["Unavailable"]

    late = scheduler(IMAGES[:1], deadline=1.0)
    (request,) = late.to_send(0.0)
    late.on_response(failed(request, grpc.StatusCode.RESOURCE_EXHAUSTED, 5.0), 0.0)
    (outcome,) = late.ready()
    assert isinstance(outcome, Overloaded)
    assert outcome.retry_after == pytest.approx(5.0)


def test_unknown_request_ids_are_a_server_error() -> None:
    stream = scheduler()
    stream.to_send(0.0)
    with pytest.raises(ServerError, match="unknown request_id"):
        stream.on_response(pb.ExplainResponse(request_id="nope"), 0.0)


def test_a_response_without_exactly_one_result_is_a_server_error() -> None:
    stream = scheduler(IMAGES[:1])
    (request,) = stream.to_send(0.0)
    stream.on_response(pb.ExplainResponse(request_id=request.request_id), 0.0)
    (outcome,) = stream.ready()
    assert isinstance(outcome, ServerError)


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        scheduler(max_in_flight=0)
