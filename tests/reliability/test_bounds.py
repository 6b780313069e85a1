"""Memory and work stay bounded when clients misbehave: a stream reader that stalls, and a
flood of large images at several times the server's capacity (a real server process; its
resident memory is read from /proc).

Bounds asserted here: a stalled stream holds at most STREAM_WINDOW answers (about 1 MiB each
in this test), so the server grows by far less than the 300 answers the client sent; under the
flood, refusals stay fast and the server's growth stays within a fixed bound while accepted
requests are answered correctly.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support.servers import png_bytes, seeded_images, start_server_process, stop_process
from tests._support.traffic import TINY_SOURCE

pytestmark = pytest.mark.timeout(240)
MIB = 2**20
STREAM_WINDOW = LimitsSettings().stream_window  # the server's default


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def tiny_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    config = tmp_path / "camserve.toml"
    config.write_text(
        f"""
[[models]]
name = "tiny"
source = "{TINY_SOURCE}"
labels = ""
resize = 0
crop = 32
max_batch_size = 8
max_delay_ms = 2
max_queue = 32
"""
    )
    process, port = start_server_process(config, tmp_path / "ready.json")
    try:
        yield process, port
    finally:
        stop_process(process)


def jpeg_bytes(size: tuple[int, int], seed: int) -> bytes:
    """A large smooth photo-like JPEG, built by upscaling a small seeded image."""
    small = seeded_images(1, size=(48, 64), seed=seed)[0]
    picture = Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def test_a_stalled_stream_reader_holds_bounded_memory_and_stalls_only_itself(
    tiny_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = tiny_process
    address = f"127.0.0.1:{port}"
    image = png_bytes(seeded_images(1, size=(512, 512), seed=3)[0])  # 1 MiB float32 answers
    sent = 300

    async def requests() -> AsyncIterator[pb.ExplainRequest]:
        for i in range(sent):
            yield pb.ExplainRequest(images=[pb.Image(encoded=image)], request_id=str(i))

    async with (
        grpc.aio.insecure_channel(address) as stalled_channel,
        grpc.aio.insecure_channel(address) as other_channel,
    ):
        explain = pb_grpc.ExplainServiceStub(other_channel).Explain
        await explain(pb.ExplainRequest(images=[pb.Image(encoded=image)]), timeout=60)
        baseline = rss_bytes(process.pid)
        stalled = pb_grpc.ExplainServiceStub(stalled_channel).ExplainStream(requests())
        # The stream works; then this client stops reading. Its window (STREAM_WINDOW) is
        # larger than the queue, so some of its requests may be refused before the first answer
        # is computed: those refusals come first. Each refusal read frees a slot for the next
        # request, so how many come first depends on how fast refusals are against the first
        # batch, not on the window.
        first = await stalled.read()
        for _ in range(sent - 1):
            if not first.HasField("error"):
                break
            assert first.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            first = await stalled.read()
        assert not first.HasField("error")
        peak = baseline
        for _ in range(20):  # 6 s: ample time to compute all 300 if nothing held it back
            await asyncio.sleep(0.3)
            peak = max(peak, rss_bytes(process.pid))
        started = time.monotonic()
        others = await asyncio.gather(
            *(
                explain(pb.ExplainRequest(images=[pb.Image(encoded=image)]), timeout=30)
                for _ in range(4)
            )
        )
        other_latency = time.monotonic() - started
        stalled.cancel()
    growth = peak - baseline
    print(f"stalled reader: RSS peak growth {growth / MIB:.0f} MiB, others in {other_latency:.2f}s")
    assert all(len(reply.results) == 1 for reply in others)
    assert other_latency < 20
    # Answers held: at most STREAM_WINDOW (1 MiB each) plus the transport's buffers.
    assert growth < (STREAM_WINDOW + 96) * MIB < sent * MIB


async def test_a_flood_of_large_images_is_refused_fast_with_bounded_memory(
    tiny_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = tiny_process
    photo = jpeg_bytes((3000, 4000), seed=5)  # 12 Mpixel: decoding dominates the server's work
    request = pb.ExplainRequest(
        images=[pb.Image(encoded=photo)],
        output=pb.OutputOptions(resolution=pb.RESOLUTION_INPUT, dtype=pb.DTYPE_UINT8),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        expected = await explain(request, timeout=60)
        baseline = rss_bytes(process.pid)
        refusal_s: list[float] = []
        answer_s: list[float] = []
        codes: list[grpc.StatusCode] = []
        peak = baseline

        async def one() -> pb.ExplainResponse | None:
            started = time.monotonic()
            try:
                reply = await explain(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                refusal_s.append(time.monotonic() - started)
                return None
            answer_s.append(time.monotonic() - started)
            return reply

        async def watch(done: asyncio.Event) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(process.pid))
                await asyncio.sleep(0.05)

        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        outcomes = await asyncio.gather(*(one() for _ in range(128)))  # 4x max_queue at once
        done.set()
        await watcher
    answered = [o for o in outcomes if o is not None]
    growth = peak - baseline
    refused_median = sorted(refusal_s)[len(refusal_s) // 2] if refusal_s else 0.0
    answered_median = sorted(answer_s)[len(answer_s) // 2]
    print(
        f"flood: {len(answered)} answered (median {answered_median * 1000:.0f} ms), "
        f"{len(refusal_s)} refused (median {refused_median * 1000:.0f} ms), RSS peak growth "
        f"{growth / MIB:.0f} MiB"
    )
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert refusal_s  # several times capacity: some must be refused
    # A refusal costs no decoding: it returns well before an answered request does (both
    # include the same upload of a ~1 MB message over one shared connection).
    assert refused_median < answered_median
    for reply in answered:
        np.testing.assert_array_equal(
            np.frombuffer(reply.results[0].heatmaps[0].data.data, np.uint8),
            np.frombuffer(expected.results[0].heatmaps[0].data.data, np.uint8),
        )
    # Decoded photos (36 MiB each as RGB) are held only for admitted requests: max_queue (32) at
    # most, and the preprocessing threads decode a few at a time.
    assert growth < 1200 * MIB
