"""A stream reads at most its window of requests ahead of the answers it has sent, and a live
stream answers every request by id, in each process layout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from camserve.server.streams import answer_stream
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import from_proto
from tests._support.servers import CAT_BYTES, COFFEE_BYTES

pytestmark = pytest.mark.timeout(30)


async def test_a_stream_reads_no_further_than_its_window_while_answers_wait() -> None:
    window, sent = 4, 20
    read: list[int] = []
    release = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        for i in range(sent):
            read.append(i)
            yield i

    async def answer(request: int) -> int:
        await release.wait()  # nothing is answered until the test says so
        return request

    def fail(request: int, exc: Exception) -> int:
        raise AssertionError(f"request {request} failed: {exc!r}")

    answers = answer_stream(requests(), answer, fail, window)
    first = asyncio.ensure_future(anext(answers))
    for _ in range(50):  # ample turns of the loop for the reader to run ahead if it could
        await asyncio.sleep(0)
    assert len(read) == window
    release.set()
    got = [await first] + [response async for response in answers]
    assert sorted(got) == list(range(sent))
    assert len(read) == sent


async def test_a_reader_that_stops_reading_holds_the_stream_at_its_window() -> None:
    window = 3
    read: list[int] = []

    async def requests() -> AsyncIterator[int]:
        for i in range(100):
            read.append(i)
            yield i

    async def answer(request: int) -> int:
        return request

    def fail(request: int, exc: Exception) -> int:
        raise AssertionError(f"request {request} failed: {exc!r}")

    answers = answer_stream(requests(), answer, fail, window)
    assert await anext(answers) == 0  # one answer taken by the transport, then no more reads
    for _ in range(50):
        await asyncio.sleep(0)
    # Its slot comes back only once the transport asks for the next answer: nothing more read.
    assert len(read) == window
    await answers.aclose()


# -- live streams, in each process layout --------------------------------------------------


@pytest.fixture(scope="module", params=["one-process", "frontends-2"])
def live(request: pytest.FixtureRequest) -> Any:
    """The shared server in one process, and in the layout with two frontends."""
    name = "camserve_server" if request.param == "one-process" else "camserve_processes"
    return request.getfixturevalue(name)


def _stream_request(index: int) -> pb.ExplainRequest:
    """Cat and coffee on both models, with a bad image and an unknown model among them."""
    if index % 7 == 3:
        return pb.ExplainRequest(images=[pb.Image(encoded=b"not an image")], request_id=str(index))
    if index % 11 == 5:
        return pb.ExplainRequest(
            model="nope", images=[pb.Image(encoded=CAT_BYTES)], request_id=str(index)
        )
    photo = CAT_BYTES if index % 2 else COFFEE_BYTES
    model = "resnet18" if index % 3 else ""
    return pb.ExplainRequest(model=model, images=[pb.Image(encoded=photo)], request_id=str(index))


@pytest.mark.timeout(180)
async def test_a_long_stream_answers_every_request_as_unary_calls_do(live: Any) -> None:
    """40 requests on one stream, answered by id; each good one exactly as the same request
    sent alone, each bad one with its own status, none lost or mixed up."""
    requests = [_stream_request(index) for index in range(40)]

    async def send() -> AsyncIterator[pb.ExplainRequest]:
        for request in requests:
            yield request

    async with grpc.aio.insecure_channel(live.address) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        replies = {reply.request_id: reply async for reply in stub.ExplainStream(send())}
        alone = {
            key: await stub.Explain(requests[int(key)])
            for key in ("0", "1", "2", "4")  # coffee/cat on both models
        }
    assert sorted(replies, key=int) == [str(i) for i in range(40)]
    for key, reply in replies.items():
        index = int(key)
        if index % 7 == 3:
            assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        elif index % 11 == 5:
            assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        else:
            assert not reply.HasField("error"), reply.error
            assert len(reply.results) == 1
    for key, reply in alone.items():
        streamed = replies[key].results[0]
        assert streamed.predictions[0].index == reply.results[0].predictions[0].index
        np.testing.assert_allclose(
            from_proto(streamed.heatmaps[0].data),
            from_proto(reply.results[0].heatmaps[0].data),
            atol=1e-5,
        )


@pytest.mark.timeout(120)
async def test_a_stream_cancelled_midway_leaves_the_server_serving(live: Any) -> None:
    """The caller goes away with requests in flight: their work is dropped, and the next call
    (on a new connection, maybe to the other frontend) is answered."""

    async def send() -> AsyncIterator[pb.ExplainRequest]:
        for index in range(64):
            yield pb.ExplainRequest(
                model="resnet18", images=[pb.Image(encoded=CAT_BYTES)], request_id=str(index)
            )

    async with grpc.aio.insecure_channel(live.address) as channel:
        call = pb_grpc.ExplainServiceStub(channel).ExplainStream(send())
        first = await call.read()
        call.cancel()
    assert first.request_id
    async with grpc.aio.insecure_channel(live.address) as channel:
        reply = await pb_grpc.ExplainServiceStub(channel).Explain(
            pb.ExplainRequest(model="resnet18", images=[pb.Image(encoded=COFFEE_BYTES)]),
            timeout=60,
        )
    assert len(reply.results) == 1
