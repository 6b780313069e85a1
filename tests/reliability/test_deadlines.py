"""Admission, deadlines and cancellation through the real server and both SDK clients, several
calls at once.

The served model waits on a gate (`tests._support.gated_model`), so a call's time in the queue
is decided by the test, not by the machine's speed. What must hold: a call that finds the queue
full is refused at once with RESOURCE_EXHAUSTED and a retry hint; a call whose deadline passes
while it waits fails with DEADLINE_EXCEEDED and its image is never computed; a call that goes
away (its deadline passed, or the caller cancelled it, or its stream ended) frees its queue
slots at once, so new calls are admitted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from camserve.client import AsyncClient, Client, DeadlineExceeded, Explanation, Overloaded
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support import gated_model
from tests._support.servers import ServerThread, png_bytes, seeded_images
from tests._support.traffic import wait_until

pytestmark = pytest.mark.timeout(120)

MAX_QUEUE = 8
IMAGE = png_bytes(seeded_images(1, size=(32, 32), seed=3)[0])


@pytest.fixture(params=[0, 2], ids=["one-process", "frontends-2"])
def server(
    gated_server_factory: Callable[..., ServerThread], request: pytest.FixtureRequest
) -> ServerThread:
    """The gated model, one image per batch, a queue of 8; the gate is closed once it serves.
    In one process, and with two frontends beside an engine process."""
    return gated_server_factory(max_queue=MAX_QUEUE, frontends=request.param)


def depth(server: ServerThread) -> int:
    """The model's queue depth: read off the runtime in one process; in the multi-process
    layout, the engine process's gauge in the supervisor's aggregated metrics."""
    if not server.settings.frontends:
        return int(server.server.registry.get("gated").queue_depth)
    engine = str(server.server.pids()["engine"])
    return int(server.metric("camserve_queue_depth", model="gated", pid=engine))


def computed(server: ServerThread) -> float:
    return server.metric("camserve_images_total", model="gated")


async def wait_for_depth(server: ServerThread, expected: int) -> None:
    await asyncio.to_thread(
        wait_until, lambda: depth(server) == expected, 5.0, f"queue depth {expected}"
    )


async def block_the_engine(client: AsyncClient) -> asyncio.Task[Explanation]:
    """A call whose batch is in the engine, held at the gate: everything else queues behind."""
    running = asyncio.create_task(client.explain(IMAGE, timeout=60))
    assert await asyncio.to_thread(gated_model.ENTERED.wait, 10)
    return running


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


async def test_a_full_queue_refuses_at_once_with_a_retry_hint(server: ServerThread) -> None:
    full = f"queue holds {MAX_QUEUE} of {MAX_QUEUE}"
    request = pb.ExplainRequest(model="gated", images=[pb.Image(encoded=IMAGE)])
    async with AsyncClient(address=server.address, retry=None) as client:
        running = await block_the_engine(client)
        waiting = [asyncio.create_task(client.explain(IMAGE, timeout=60)) for _ in range(MAX_QUEUE)]
        await wait_for_depth(server, MAX_QUEUE)
        async with grpc.aio.insecure_channel(server.address) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=10)
        assert time.monotonic() - started < 1.0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full in (refused.value.details() or "")
        assert retry_delay(refused.value) > 0
        # Both SDK clients turn the same refusal into Overloaded carrying the server's hint.
        with pytest.raises(Overloaded, match=full) as overloaded:
            await client.explain(IMAGE, timeout=10)
        with (
            Client(address=server.address, retry=None) as sync_client,
            pytest.raises(Overloaded, match=full) as overloaded_sync,
        ):
            await asyncio.to_thread(sync_client.explain, IMAGE, timeout=10)
        assert overloaded.value.retry_after
        assert overloaded_sync.value.retry_after
        gated_model.GATE.set()
        answers = await asyncio.gather(running, *waiting)
    assert len(answers) == MAX_QUEUE + 1


async def test_calls_whose_deadline_passes_in_the_queue_fail_and_are_never_computed(
    server: ServerThread,
) -> None:
    async with AsyncClient(address=server.address, retry=None) as client:
        running = await block_the_engine(client)
        before = computed(server)
        started = time.monotonic()
        short = [asyncio.create_task(client.explain(IMAGE, timeout=0.4)) for _ in range(5)]
        patient = [asyncio.create_task(client.explain(IMAGE, timeout=60)) for _ in range(2)]
        await wait_for_depth(server, 7)

        failures = await asyncio.gather(*short, return_exceptions=True)
        assert all(isinstance(f, DeadlineExceeded) for f in failures), failures
        assert time.monotonic() - started < 5.0
        await wait_for_depth(server, 2)  # the expired calls left the queue; the patient stayed
        assert computed(server) == before

        gated_model.GATE.set()
        answers = await asyncio.gather(running, *patient)
    assert all(isinstance(a, Explanation) for a in answers)
    await asyncio.to_thread(wait_until, lambda: computed(server) - before == 3)
    assert depth(server) == 0


async def test_cancelling_the_newest_queued_call_takes_only_it_out_of_the_queue(
    server: ServerThread,
) -> None:
    """The queue is a FIFO: a call cancelled behind another one must leave it too, not only a
    call at its head."""
    async with AsyncClient(address=server.address, retry=None) as client:
        running = await block_the_engine(client)
        first = asyncio.create_task(client.explain(IMAGE, timeout=60))
        await wait_for_depth(server, 1)
        second = asyncio.create_task(client.explain(IMAGE, timeout=60))
        await wait_for_depth(server, 2)
        second.cancel()
        await wait_for_depth(server, 1)
        gated_model.GATE.set()
        answers = await asyncio.gather(running, first)
    assert all(isinstance(a, Explanation) for a in answers)


async def test_cancelled_calls_free_their_slots_for_new_ones(server: ServerThread) -> None:
    async with AsyncClient(address=server.address, retry=None) as client:
        running = await block_the_engine(client)
        before = computed(server)
        waiting = [asyncio.create_task(client.explain(IMAGE, timeout=60)) for _ in range(MAX_QUEUE)]
        await wait_for_depth(server, MAX_QUEUE)
        with pytest.raises(Overloaded):
            await client.explain(IMAGE, timeout=10)

        for task in waiting:
            task.cancel()
        cancelled = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(c, asyncio.CancelledError) for c in cancelled)
        await wait_for_depth(server, 0)

        admitted = [
            asyncio.create_task(client.explain(IMAGE, timeout=60)) for _ in range(MAX_QUEUE)
        ]
        await wait_for_depth(server, MAX_QUEUE)
        gated_model.GATE.set()
        answers = await asyncio.gather(running, *admitted)
    assert len(answers) == MAX_QUEUE + 1
    await asyncio.to_thread(wait_until, lambda: computed(server) - before == MAX_QUEUE + 1)


async def test_stream_past_its_deadline_frees_its_slots(server: ServerThread) -> None:
    """A stream whose deadline passes with requests still queued ends with DEADLINE_EXCEEDED;
    its queued requests leave the queue and are never computed."""
    async with AsyncClient(address=server.address, retry=None) as client:
        running = await block_the_engine(client)
        before = computed(server)
        outcomes: list[Any] = []

        async def consume() -> None:
            async for outcome in client.explain_many(
                [IMAGE] * 6, max_in_flight=6, timeout=0.5, return_exceptions=True
            ):
                outcomes.append(outcome)

        with pytest.raises(DeadlineExceeded):
            await consume()
        assert outcomes == []
        await wait_for_depth(server, 0)

        late = asyncio.create_task(client.explain(IMAGE, timeout=60))
        await wait_for_depth(server, 1)
        gated_model.GATE.set()
        answers = await asyncio.gather(running, late)
    assert all(isinstance(a, Explanation) for a in answers)
    await asyncio.to_thread(wait_until, lambda: computed(server) - before == 2)
