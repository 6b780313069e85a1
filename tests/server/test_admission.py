"""Admission control through the real server and the SDK: full queue, expired deadlines,
cancelled calls.

The served model waits on a gate (`tests._support.gated_model`), so the tests decide exactly
when a batch finishes instead of racing the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from camserve.client import AsyncClient, Client, Overloaded
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support import gated_model
from tests._support.servers import ServerThread, png_bytes, seeded_images

IMAGE = png_bytes(seeded_images(1, size=(32, 32))[0])
REQUEST = pb.ExplainRequest(model="gated", images=[pb.Image(encoded=IMAGE)])


@pytest.fixture
def gated_server(gated_server_factory: Callable[..., ServerThread]) -> ServerThread:
    return gated_server_factory(max_queue=2)


def queue_depth(server: ServerThread) -> int:
    return int(server.server.registry.get("gated").queue_depth)


async def wait_until(condition: Any) -> None:
    """Polls `condition` until true; fails after 30 s."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 - the state lives on the server's thread
            await asyncio.sleep(0.01)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The google.rpc.RetryInfo hint carried in the rich status details."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    raise AssertionError("no RetryInfo detail")


async def test_full_queue_answers_resource_exhausted_at_once(gated_server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(gated_server.address) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        running = asyncio.ensure_future(explain(REQUEST))
        assert await asyncio.to_thread(gated_model.ENTERED.wait, 30)
        queued = [asyncio.ensure_future(explain(REQUEST)) for _ in range(2)]
        await wait_until(lambda: queue_depth(gated_server) == 2)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await explain(REQUEST)
        assert time.monotonic() - started < 1.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue holds 2 of 2" in (refused.value.details() or "")
        assert retry_delay(refused.value) > 0
        # The SDK turns the same refusal into Overloaded carrying the server's retry hint.
        async with AsyncClient(address=gated_server.address, retry=None) as async_client:
            with pytest.raises(Overloaded, match="queue holds 2 of 2") as overloaded:
                await async_client.explain(IMAGE)
        with (
            Client(address=gated_server.address, retry=None) as client,
            pytest.raises(Overloaded, match="queue holds 2 of 2") as overloaded_sync,
        ):
            await asyncio.to_thread(client.explain, IMAGE)
        assert overloaded.value.retry_after
        assert overloaded_sync.value.retry_after
        gated_model.GATE.set()
        replies = await asyncio.gather(running, *queued)
    assert all(len(reply.results) == 1 for reply in replies)


async def test_expired_deadline_is_never_computed(gated_server: ServerThread) -> None:
    computed_before = gated_server.metric("camserve_images_total", model="gated")
    async with grpc.aio.insecure_channel(gated_server.address) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        running = asyncio.ensure_future(explain(REQUEST))
        assert await asyncio.to_thread(gated_model.ENTERED.wait, 30)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await explain(REQUEST, timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: queue_depth(gated_server) == 0)
        gated_model.GATE.set()
        await running
    assert gated_server.metric("camserve_images_total", model="gated") - computed_before == 1


async def test_cancelled_call_frees_its_slot(gated_server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(gated_server.address) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        running = asyncio.ensure_future(explain(REQUEST))
        assert await asyncio.to_thread(gated_model.ENTERED.wait, 30)
        waiting = [explain(REQUEST) for _ in range(2)]
        await wait_until(lambda: queue_depth(gated_server) == 2)
        for call in waiting:
            call.cancel()
        await wait_until(lambda: queue_depth(gated_server) == 0)
        accepted = [asyncio.ensure_future(explain(REQUEST)) for _ in range(2)]
        await wait_until(lambda: queue_depth(gated_server) == 2)
        gated_model.GATE.set()
        replies = await asyncio.gather(running, *accepted)
    assert len(replies) == 3
