"""Sync and asyncio clients against the scripted stand-in service (see conftest.py): retries with
the server's hint, bearer metadata, reordering of stream answers, per-request stream errors."""

from __future__ import annotations

import time

import grpc
import pytest

from camserve.client import (
    AsyncClient,
    Client,
    Explanation,
    InvalidArgument,
    Overloaded,
    RetryPolicy,
    Unavailable,
)
from tests._support.client_fakes import BAD, BUSY_ONCE, HEATMAP

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
IMAGES = [f"image-{i}".encode() for i in range(10)]


def labels(outcomes) -> list[str]:
    return [o.top.label if isinstance(o, Explanation) else type(o).__name__ for o in outcomes]


def test_overloaded_calls_wait_for_the_server_hint_then_succeed(fake_server) -> None:
    fake_server.service.unary_failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 0.3)]
    with Client(address=fake_server.address, retry=FAST) as client:
        started = time.monotonic()
        explanation = client.explain(b"x")
    assert time.monotonic() - started >= 0.3
    assert fake_server.service.explain_calls == 2
    assert explanation.top.label == "x"
    assert explanation.model == "fake"
    assert explanation.layer == "features"
    assert (explanation.heatmap() == HEATMAP).all()


def test_without_retries_overloaded_carries_the_hint_and_message(fake_server) -> None:
    fake_server.service.unary_failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 0.3)]
    with Client(address=fake_server.address, retry=None) as client, pytest.raises(Overloaded) as e:
        client.explain(b"x")
    assert e.value.retry_after == pytest.approx(0.3)
    assert e.value.message == "busy"
    assert isinstance(e.value.__cause__, grpc.RpcError)


def test_unavailable_is_retried_up_to_the_attempt_limit(fake_server) -> None:
    fake_server.service.unary_failures = [(grpc.StatusCode.UNAVAILABLE, "draining", 0.0)] * 2
    with Client(address=fake_server.address, retry=FAST) as client:
        assert client.explain(b"x").top.label == "x"
    fake_server.service.unary_failures = [(grpc.StatusCode.UNAVAILABLE, "draining", 0.0)] * 3
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with Client(address=fake_server.address, retry=policy) as client, pytest.raises(Unavailable):
        client.explain(b"x")
    assert fake_server.service.explain_calls == 6


def test_the_bearer_token_travels_as_metadata(fake_server) -> None:
    with Client(address=fake_server.address, token="s3cret") as client:
        client.explain(b"x")
    with Client(address=fake_server.address) as client:
        client.explain(b"x")
    with_token, without = fake_server.service.metadata
    assert with_token["authorization"] == "Bearer s3cret"
    assert "authorization" not in without


def test_explain_batch_sends_one_request(fake_server) -> None:
    with Client(address=fake_server.address) as client:
        results = client.explain_batch([b"a", b"b", b"c"], request_id="batch-1")
    assert labels(results) == ["a", "b", "c"]
    assert {r.request_id for r in results} == {"batch-1"}
    assert {r.batch_size for r in results} == {3}
    assert fake_server.service.explain_calls == 1


def test_stream_answers_come_back_in_input_order_within_the_bound(fake_server) -> None:
    with Client(address=fake_server.address) as client:
        results = list(client.explain_many(IMAGES, max_in_flight=4))
    assert labels(results) == [image.decode() for image in IMAGES]
    assert 1 < fake_server.service.most_outstanding <= 4


def test_a_failed_stream_request_raises_in_its_place(fake_server) -> None:
    with Client(address=fake_server.address) as client:
        stream = client.explain_many([b"a", BAD, b"c"])
        assert next(stream).top.label == "a"
        with pytest.raises(InvalidArgument, match="not an image"):
            next(stream)
        outcomes = list(client.explain_many([b"a", BAD, b"c"], return_exceptions=True))
    assert labels(outcomes) == ["a", "InvalidArgument", "c"]


def test_overloaded_stream_requests_are_sent_again(fake_server) -> None:
    with Client(address=fake_server.address, retry=FAST) as client:
        results = list(client.explain_many([b"a", BUSY_ONCE, b"c"]))
    assert labels(results) == ["a", BUSY_ONCE.decode(), "c"]
    assert len(fake_server.service.stream_requests) == 4


def test_leaving_the_stream_early_cancels_it(fake_server) -> None:
    with Client(address=fake_server.address) as client:
        for _ in client.explain_many(IMAGES, max_in_flight=3):
            break
        assert client.explain(b"still usable").top.label == "still usable"


def test_a_closed_client_says_so() -> None:
    client = Client(address="127.0.0.1:1")
    client.close()
    client.close()  # closing twice is fine
    with pytest.raises(RuntimeError, match="has been closed"):
        client.explain(b"x")
    with pytest.raises(RuntimeError, match="has been closed"), client:
        pass
    with pytest.raises(RuntimeError, match="has been closed"):
        client.explain_many([b"x"])


async def test_async_retries_with_the_hint_and_sends_the_token(fake_server) -> None:
    fake_server.service.unary_failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 0.2)]
    async with AsyncClient(address=fake_server.address, retry=FAST, token="t") as client:
        started = time.monotonic()
        explanation = await client.explain(b"x")
    assert time.monotonic() - started >= 0.2
    assert explanation.top.label == "x"
    assert [m["authorization"] for m in fake_server.service.metadata] == ["Bearer t"] * 2


async def test_async_overloaded_carries_the_hint(fake_server) -> None:
    fake_server.service.unary_failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", 0.3)]
    async with AsyncClient(address=fake_server.address, retry=None) as client:
        with pytest.raises(Overloaded) as refused:
            await client.explain(b"x")
    assert refused.value.retry_after == pytest.approx(0.3)
    assert refused.value.message == "busy"


async def test_async_stream_keeps_input_order_errors_and_retries(fake_server) -> None:
    async with AsyncClient(address=fake_server.address, retry=FAST) as client:
        ordered = [e async for e in client.explain_many(IMAGES, max_in_flight=4)]
        mixed = [
            e
            async for e in client.explain_many([b"a", BAD, BUSY_ONCE, b"d"], return_exceptions=True)
        ]
        with pytest.raises(InvalidArgument):
            async for _ in client.explain_many([BAD]):
                pass
        batch = await client.explain_batch([b"p", b"q"])
    assert labels(ordered) == [image.decode() for image in IMAGES]
    assert fake_server.service.most_outstanding <= 4
    assert labels(mixed) == ["a", "InvalidArgument", BUSY_ONCE.decode(), "d"]
    assert labels(batch) == ["p", "q"]


async def test_a_closed_async_client_says_so() -> None:
    client = AsyncClient(address="127.0.0.1:1")
    await client.close()
    with pytest.raises(RuntimeError, match="has been closed"):
        await client.models()
    with pytest.raises(RuntimeError, match="has been closed"):
        async with client:
            pass
