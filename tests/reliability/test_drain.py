"""SIGTERM on a real server process: every accepted request is answered, new work is refused,
and nothing holds the process past its grace period.

Once draining, requests the server had started run to their answer; calls (and new requests on
an open stream) it had not started get the retryable UNAVAILABLE; health turns NOT_SERVING; an
idle stream the client never closes does not keep the process alive: it exits 0 in time.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import from_proto
from tests._support.servers import png_bytes, seeded_images, start_server_process, stop_process

pytestmark = pytest.mark.timeout(300)
GRACE_S = 4.0
UNARY_GRACE_S = 30.0  # long enough that every started unary request finishes on a slow machine
IMAGE = png_bytes(seeded_images(1, size=(64, 64), seed=4)[0])


def start(
    tmp_path: Path, weights: Path, grace_s: float, frontends: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """`camserve-server` as a child process (resnet18 at 64x64) with the given grace period, in
    one process or with `frontends` gRPC frontends beside an engine process."""
    config = tmp_path / "camserve.toml"
    config.write_text(
        f"""
[server]
grace_period_s = {grace_s}
frontends = {frontends}
[[models]]
name = "resnet18"
source = "torchvision:resnet18"
weights = "{weights.as_posix()}"
labels = ""
resize = 0
crop = 64
max_batch_size = 4
max_delay_ms = 2
"""
    )
    return start_server_process(config, tmp_path / "ready.json")


@pytest.fixture(params=[0, 2], ids=["one-process", "frontends-2"])
def server_process(
    tmp_path: Path, resnet18_weights: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A server process with a short grace period, in each process layout; killed if a test
    leaves it running."""
    process, port = start(tmp_path, resnet18_weights, GRACE_S, request.param)
    try:
        yield process, port
    finally:
        stop_process(process)


def request(request_id: str) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[pb.Image(encoded=IMAGE)], request_id=request_id)


async def health(address: str) -> str:
    """NOT_SERVING/SERVING, or the status code name when the call itself fails."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_sigterm_refuses_new_work_and_exits_in_time_with_a_stream_open(
    server_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = server_process
    address = f"127.0.0.1:{port}"
    outgoing: asyncio.Queue[pb.ExplainRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ExplainRequest]:
        while (item := await outgoing.get()) is not None:
            yield item

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        stream = stub.ExplainStream(requests())
        await outgoing.put(request("before"))
        first = await stream.read()
        assert first.request_id == "before"
        assert not first.HasField("error")

        # The stream stays open and idle (never half-closed) from here on.
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with asyncio.timeout(GRACE_S):
            while (status := await health(address)) == "SERVING":  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.02)
        assert status in ("NOT_SERVING", "UNAVAILABLE")

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Explain(request("after"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        await outgoing.put(request("on-open-stream"))
        late = await stream.read()
        if late is not grpc.aio.EOF:  # answered while draining: refused, never computed
            assert late.request_id == "on-open-stream"
            assert late.error.code == grpc.StatusCode.UNAVAILABLE.value[0], late.error.message
            assert not late.results

        exit_code = await asyncio.to_thread(process.wait, GRACE_S + 15)
        exited_after = time.monotonic() - signalled
        stream.cancel()
    print(f"\ndrain: exited {exit_code} {exited_after:.2f}s after SIGTERM (grace {GRACE_S}s)")
    assert exit_code == 0
    assert exited_after < GRACE_S + 5


async def test_request_in_flight_on_a_stream_at_sigterm_is_answered(
    server_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    """A stream request sent just before SIGTERM gets its response, a result if the server had
    started it or UNAVAILABLE if not, and a client that half-closes sees the stream end OK."""
    process, port = server_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = pb_grpc.ExplainServiceStub(channel).ExplainStream()
        for i in range(8):
            await stream.write(request(f"r{i}"))
        first = await stream.read()
        process.send_signal(signal.SIGTERM)
        await stream.done_writing()
        replies = [first]
        while (reply := await stream.read()) is not grpc.aio.EOF:
            replies.append(reply)
        code = await stream.code()
        exit_code = await asyncio.to_thread(process.wait, GRACE_S + 15)
    assert code == grpc.StatusCode.OK
    assert sorted(r.request_id for r in replies) == [f"r{i}" for i in range(8)]
    for reply in replies:
        if reply.HasField("error"):
            assert reply.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        else:
            assert len(reply.results) == 1
    assert exit_code == 0


@pytest.mark.parametrize("frontends", [0, 2], ids=["one-process", "frontends-2"])
async def test_sigterm_answers_every_accepted_request(
    tmp_path: Path, resnet18_weights: Path, frontends: int
) -> None:
    process, port = start(tmp_path, resnet18_weights, UNARY_GRACE_S, frontends)
    images = [png_bytes(image) for image in seeded_images(4, size=(64, 64))]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            explain = pb_grpc.ExplainServiceStub(channel).Explain
            requests = [
                pb.ExplainRequest(images=[pb.Image(encoded=images[i % 4])], request_id=str(i))
                for i in range(100)
            ]
            calls = [asyncio.ensure_future(explain(request, timeout=120)) for request in requests]
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await explain(requests[0], timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        replies = [o for o in outcomes if isinstance(o, pb.ExplainResponse)]
        refusals = [o for o in outcomes if not isinstance(o, pb.ExplainResponse)]
        # Requests the server had started are answered; any it had not started when the signal
        # came are refused with the retryable UNAVAILABLE. None is cancelled or lost.
        assert len(replies) >= 8
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
            for r in refusals
        ), refusals
        by_image: dict[int, np.ndarray] = {}
        for reply in replies:  # the same image gets the same heatmap, whatever its batch
            heatmap = from_proto(reply.results[0].heatmaps[0].data)
            expected = by_image.setdefault(int(reply.request_id) % 4, heatmap)
            np.testing.assert_allclose(heatmap, expected, atol=1e-5)
        assert process.wait(timeout=UNARY_GRACE_S + 10) == 0
    finally:
        stop_process(process)
