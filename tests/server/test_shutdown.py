"""SIGTERM on a real server process: accepted requests are all answered, then it exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import png_bytes, seeded_images, start_server_process, stop_process

from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import from_proto

pytestmark = pytest.mark.timeout(300)
GRACE_S = 30


def start(tmp_path: Path, weights: Path) -> tuple[subprocess.Popen[bytes], int]:
    config = tmp_path / "camserve.toml"
    config.write_text(
        f"""
[server]
grace_period_s = {GRACE_S}
[[models]]
name = "resnet18"
source = "torchvision:resnet18"
weights = "{weights}"
labels = ""
max_batch_size = 8
max_delay_ms = 5
"""
    )
    return start_server_process(config, tmp_path / "ready.json")


async def test_sigterm_answers_every_accepted_request(
    tmp_path: Path, resnet18_weights: Path
) -> None:
    process, port = start(tmp_path, resnet18_weights)
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
        assert process.wait(timeout=GRACE_S + 10) == 0
    finally:
        stop_process(process)
