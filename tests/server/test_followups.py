"""Gradient-free methods and faithfulness scores served through the batcher, end to end.

A real server, raw gRPC calls: the maps and scores must equal what the engine computes offline
for the same inputs, however the forward-only rows were batched with other requests' work; a
request that could never fit the queue is refused without a retry hint; a Grad-CAM request
sent while a ScoreCAM request runs is answered within a few batch times, not after it.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from camserve.server.engine import (
    CamEngine,
    RowRequest,
    explain_all,
    normalise,
    plan_from_results,
    to_input,
)
from camserve.server.engine.scoring import run_scores
from camserve.server.models.loading import build_model
from camserve.server.settings import Settings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.tensors import from_proto, to_proto
from tests._support.servers import ServerThread
from tests._support.traffic import small_resnet

pytestmark = pytest.mark.timeout(240)
SIZE = 64
BATCH = 8


@pytest.fixture(scope="module")
def server(resnet18_weights: Path) -> Iterator[ServerThread]:
    """resnet18 at 64x64: layer4 has 512 channels, so ScoreCAM there is 64 batches of 8 rows."""
    busy = small_resnet(resnet18_weights, max_batch_size=BATCH, max_queue=1200)
    small = small_resnet(resnet18_weights, name="small-queue", max_batch_size=BATCH, max_queue=64)
    running = ServerThread(Settings(port=0, metrics_port=-1, http_port=0, models=(busy, small)))
    yield running
    running.stop(grace=1.0)


def _inputs(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, SIZE, SIZE, generator=generator)


def _request(images: torch.Tensor, methods: tuple[str, ...], **fields: object) -> pb.ExplainRequest:
    output = fields.pop("output", None) or pb.OutputOptions(resolution=pb.RESOLUTION_INPUT)
    return pb.ExplainRequest(
        model=str(fields.pop("model", "resnet18")),
        images=[pb.Image(tensor=to_proto(image.numpy())) for image in images],
        methods=[METHOD_BY_NAME[name] for name in methods],
        output=output,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def offline(resnet18_weights: Path) -> CamEngine:
    spec = small_resnet(resnet18_weights)
    return CamEngine(build_model(spec), device="cpu")


def _maps(response: pb.ExplainResponse) -> list[dict[tuple[int, int], np.ndarray]]:
    return [
        {(h.method, h.class_index): from_proto(h.data) for h in result.heatmaps}
        for result in response.results
    ]


def test_gradient_free_maps_equal_the_engine_offline(
    server: ServerThread, offline: CamEngine
) -> None:
    images = _inputs(2, seed=3)
    methods = ("ablationcam", "scorecam", "gradcam")
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.ExplainServiceStub(channel).Explain(
            _request(images, methods, layer="layer4"), timeout=120
        )
    rows = [RowRequest("layer4", methods, top_k=1)] * 2
    expected = explain_all(offline, images, rows, chunk_rows=BATCH)
    for got, want in zip(_maps(response), expected, strict=True):
        for (method, class_index), cam in want.maps.items():
            ours = got[(METHOD_BY_NAME[method], class_index)]
            reference = normalise(to_input(cam, (SIZE, SIZE)))
            np.testing.assert_allclose(ours, reference.numpy(), atol=1e-4, err_msg=method)


def test_scores_equal_the_engine_offline_and_come_with_each_heatmap(
    server: ServerThread, offline: CamEngine
) -> None:
    images = _inputs(3, seed=5)
    output = pb.OutputOptions(
        resolution=pb.RESOLUTION_INPUT,
        scores=[pb.SCORE_CONFIDENCE_CHANGE, pb.SCORE_DELETION_AUC, pb.SCORE_INSERTION_AUC],
        score_steps=10,
        score_curves=True,
    )
    request = _request(images, ("gradcam", "layercam"), output=output)
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=120)
    rows = [RowRequest("layer4", ("gradcam", "layercam"), top_k=1)] * 3
    results = offline.explain_batch(images, rows)
    scores = ("confidence_change", "deletion_auc", "insertion_auc")
    plan, keys = plan_from_results(images, results, scores, steps=10)
    expected = dict(zip(keys, run_scores(plan, offline.predict, max_rows=BATCH), strict=True))
    for index, result in enumerate(response.results):
        assert len(result.heatmaps) == 2
        for heatmap in result.heatmaps:
            name = "gradcam" if heatmap.method == pb.METHOD_GRADCAM else "layercam"
            want = expected[(index, name, heatmap.class_index)]
            assert heatmap.confidence_change == pytest.approx(want.confidence_change, abs=1e-4)
            assert heatmap.deletion_auc == pytest.approx(want.deletion_auc, abs=1e-4)
            assert heatmap.insertion_auc == pytest.approx(want.insertion_auc, abs=1e-4)
            assert want.deletion is not None
            np.testing.assert_allclose(
                heatmap.deletion_curve, want.deletion.probabilities, atol=1e-4
            )
            assert len(heatmap.insertion_curve) == 11


def test_a_request_larger_than_the_queue_is_served_in_waves_when_the_model_is_idle(
    server: ServerThread,
) -> None:
    images = _inputs(1, seed=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        # 513 forward passes against a queue of 64: the whole queue, refilled wave by wave.
        small = stub.Explain(_request(images, ("scorecam",), model="small-queue"), timeout=120)
        roomy = stub.Explain(_request(images, ("scorecam",)), timeout=120)
    got = [h.data for h in small.results[0].heatmaps]
    want = [h.data for h in roomy.results[0].heatmaps]
    assert len(got) == len(want) == 1
    np.testing.assert_allclose(from_proto(got[0]), from_proto(want[0]), atol=1e-6)


async def _stream(
    stub: pb_grpc.ExplainServiceStub, requests: list[pb.ExplainRequest], gaps: list[float]
) -> dict[str, float]:
    """Sends `requests` on one stream, `gaps[i]` seconds apart; answer time by request id."""
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}

    async def outgoing() -> AsyncIterator[pb.ExplainRequest]:
        for request, gap in zip(requests, gaps, strict=True):
            await asyncio.sleep(gap)
            sent[request.request_id] = time.monotonic()
            yield request

    async for response in stub.ExplainStream(outgoing(), timeout=180):
        assert not response.HasField("error"), response.error.message
        answered[response.request_id] = time.monotonic() - sent[response.request_id]
    return answered


def test_grad_cam_answers_do_not_wait_behind_score_cam_work(server: ServerThread) -> None:
    heavy = _request(_inputs(1, seed=9), ("scorecam",), layer="layer4", request_id="scorecam")
    light = [
        _request(_inputs(1, seed=10 + i), ("gradcam",), request_id=f"gradcam-{i}") for i in range(4)
    ]

    async def run() -> tuple[list[float], dict[str, float]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainServiceStub(channel)
            alone = []
            for request in light:  # Grad-CAM's latency on an idle server
                started = time.monotonic()
                await stub.Explain(request, timeout=30)
                alone.append(time.monotonic() - started)
            answered = await _stream(stub, [heavy, *light], [0.0, 0.3, 0.1, 0.1, 0.1])
            return alone, answered

    alone, answered = asyncio.run(run())
    heavy_s = answered.pop("scorecam")
    idle = float(np.median(alone))
    print(
        f"\nscorecam {heavy_s:.2f}s; gradcam idle {idle * 1000:.0f} ms, beside it "
        f"{', '.join(f'{s * 1000:.0f}' for s in answered.values())} ms"
    )
    assert len(answered) == len(light)
    # ScoreCAM takes dozens of batches; each Grad-CAM request waits for at most the wave of
    # ScoreCAM rows ahead of it and its own batch.
    assert heavy_s > 10 * idle
    assert max(answered.values()) < max(6 * idle, 0.5) < heavy_s


def test_a_stream_mixing_requests_with_and_without_scores_returns_each_its_own(
    server: ServerThread,
) -> None:
    scored = pb.OutputOptions(
        resolution=pb.RESOLUTION_INPUT,
        scores=[pb.SCORE_CONFIDENCE_CHANGE, pb.SCORE_DELETION_AUC],
        score_steps=8,
    )
    requests = [
        _request(
            _inputs(1 + i % 2, seed=40 + i),
            ("gradcam",),
            output=scored if i % 2 == 0 else None,
            request_id=f"r{i}",
        )
        for i in range(6)
    ]

    async def run() -> tuple[dict[str, pb.ExplainResponse], dict[str, pb.ExplainResponse]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExplainServiceStub(channel)
            alone = {r.request_id: await stub.Explain(r, timeout=60) for r in requests}

            async def outgoing() -> AsyncIterator[pb.ExplainRequest]:
                for request in requests:
                    yield request

            streamed = {r.request_id: r async for r in stub.ExplainStream(outgoing(), timeout=120)}
            return alone, streamed

    alone, streamed = asyncio.run(run())
    assert set(streamed) == {r.request_id for r in requests}
    for i, request in enumerate(requests):
        got, want = streamed[request.request_id], alone[request.request_id]
        assert len(got.results) == len(request.images)
        for result, reference in zip(got.results, want.results, strict=True):
            for heatmap, expected in zip(result.heatmaps, reference.heatmaps, strict=True):
                assert heatmap.HasField("confidence_change") is (i % 2 == 0)
                assert heatmap.HasField("deletion_auc") is (i % 2 == 0)
                assert not heatmap.HasField("insertion_auc")
                if i % 2 == 0:
                    assert heatmap.confidence_change == pytest.approx(
                        expected.confidence_change, abs=1e-5
                    )
                    # Batched with other rows, a map may differ by ~1e-6, which can swap the rank
                    # of two nearly equal pixels: the curve moves by a step's share of them.
                    assert heatmap.deletion_auc == pytest.approx(expected.deletion_auc, abs=1e-4)


@pytest.mark.gpu
def test_scores_of_a_request_mixing_device_decoded_jpegs_and_pngs_on_cuda(
    resnet18_weights: Path,
) -> None:
    from PIL import Image

    from tests._support.servers import CAT_BYTES, png_bytes

    cat = np.asarray(Image.open(io.BytesIO(CAT_BYTES)).convert("RGB"))
    spec = small_resnet(resnet18_weights, device="cuda")
    running = ServerThread(Settings(port=0, metrics_port=-1, models=(spec,)))
    try:
        request = pb.ExplainRequest(
            model="resnet18",
            images=[pb.Image(encoded=CAT_BYTES), pb.Image(encoded=png_bytes(cat))],
            output=pb.OutputOptions(scores=[pb.SCORE_CONFIDENCE_CHANGE]),
        )
        with grpc.insecure_channel(running.address) as channel:
            reply = pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=60)
    finally:
        running.stop(grace=1.0)
    assert [len(result.heatmaps) for result in reply.results] == [1, 1]
    assert all(r.heatmaps[0].HasField("confidence_change") for r in reply.results)
