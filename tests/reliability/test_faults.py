"""The fault campaign: a model that fails on command, behind a real server on loopback.

Every request read from a stream or sent as a unary call gets exactly one answer: its result, or
a precise status (INTERNAL for a server fault, NaN logits included, RESOURCE_EXHAUSTED for
out-of-memory on one image); the other requests of the same batch succeed; a model that keeps
failing turns its health NOT_SERVING (and ModelInfo.ready false) and back once it recovers,
through a request or a periodic probe; unparsable request bytes are INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve.client import AsyncClient, Explanation, ServerError
from camserve.server.settings import ModelSettings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support import faulty_model
from tests._support.faulty_model import FAULT, marked
from tests._support.servers import ServerThread, png_bytes, seeded_images

pytestmark = pytest.mark.timeout(180)
IMAGES = seeded_images(6, size=(32, 32), seed=11)
MARKED = png_bytes(marked(IMAGES[0]))
GOOD = [png_bytes(image) for image in IMAGES[1:]]
HEALTH_NAME = "camserve.v1.ExplainService/faulty"


def faulty_settings(health_probe_s: float = 0.0) -> ModelSettings:
    return ModelSettings(
        name="faulty",
        source=faulty_model.SOURCE,
        labels="",
        max_batch_size=8,
        max_delay_ms=40,
        failing_after=3,
        health_probe_s=health_probe_s,
        **faulty_model.RECIPE,  # type: ignore[arg-type]
    )


@pytest.fixture
def faulty_server(server_factory: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    """The faulty model, probed by requests only (no periodic probe)."""
    FAULT.reset()
    yield server_factory(models=(faulty_settings(),), metrics_port=-1)
    FAULT.reset()


@pytest.fixture
def probed_server(server_factory: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    """The faulty model, probed every 0.2 s while failing."""
    FAULT.reset()
    yield server_factory(models=(faulty_settings(health_probe_s=0.2),), metrics_port=-1)
    FAULT.reset()


def request(image: bytes, request_id: str) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[pb.Image(encoded=image)], request_id=request_id)


async def stream_all(address: str, requests: list[pb.ExplainRequest]) -> list[pb.ExplainResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.ExplainServiceStub(channel).ExplainStream(iter(requests), timeout=60)
        return [response async for response in call]


async def health(address: str, service: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (lambda: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "INTERNAL"),
        (lambda: torch.OutOfMemoryError("CUDA out of memory"), "RESOURCE_EXHAUSTED"),
    ],
)
async def test_a_stream_answers_every_request_when_the_engine_fails_one(
    faulty_server: ServerThread, error: Callable[[], BaseException], code: str
) -> None:
    FAULT.reset("marked", error)
    requests = [request(image, f"good-{i}") for i, image in enumerate(GOOD)]
    requests.insert(2, request(MARKED, "marked"))
    responses = await stream_all(faulty_server.address, requests)
    by_id = {r.request_id: r for r in responses}
    assert sorted(by_id) == sorted(r.request_id for r in requests)  # exactly one answer each
    assert len(responses) == len(requests)
    failed = by_id.pop("marked")
    assert failed.error.code == getattr(grpc.StatusCode, code).value[0]
    assert failed.error.message
    assert all(not r.HasField("error") and len(r.results) == 1 for r in by_id.values())
    # The retry of the failed batch's halves ran only after the failed batch was released.
    assert FAULT.failed_input_alive
    assert not any(FAULT.failed_input_alive)


async def test_an_out_of_memory_pass_of_input_gradients_is_split_and_retried(
    faulty_server: ServerThread,
) -> None:
    """Rows with their input gradient (saliency, SmoothGrad's copies) run in passes of their
    own; one that runs out of memory is bisected like any batch, so only its culprit fails."""
    FAULT.reset("marked", lambda: torch.OutOfMemoryError("CUDA out of memory"))
    methods = [pb.METHOD_SALIENCY, pb.METHOD_SMOOTHGRAD, pb.METHOD_GRADCAM]
    options = pb.SaliencyOptions(samples=3, seed=1)
    requests = [
        pb.ExplainRequest(
            images=[pb.Image(encoded=image)],
            methods=methods,
            pixel_attribution=options,
            request_id=f"good-{i}",
        )
        for i, image in enumerate(GOOD)
    ]
    requests.insert(
        1,
        pb.ExplainRequest(
            images=[pb.Image(encoded=MARKED)],
            methods=methods,
            pixel_attribution=options,
            request_id="marked",
        ),
    )
    by_id = {r.request_id: r for r in await stream_all(faulty_server.address, requests)}
    assert sorted(by_id) == sorted(r.request_id for r in requests)
    failed = by_id.pop("marked")
    assert failed.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    for answer in by_id.values():
        assert not answer.HasField("error")
        assert [h.method for h in answer.results[0].heatmaps] == methods


async def test_unary_calls_in_one_batch_fail_alone(faulty_server: ServerThread) -> None:
    FAULT.reset("marked")
    async with grpc.aio.insecure_channel(faulty_server.address) as channel:
        explain = pb_grpc.ExplainServiceStub(channel).Explain
        calls = [explain(request(MARKED, "marked"), timeout=60)]
        calls += [explain(request(image, f"good-{i}"), timeout=60) for i, image in enumerate(GOOD)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    failure, *successes = outcomes
    assert isinstance(failure, grpc.aio.AioRpcError)
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert "server fault" in (failure.details() or "")
    assert all(isinstance(s, pb.ExplainResponse) and len(s.results) == 1 for s in successes)


async def test_a_persistent_fault_turns_the_model_not_serving_until_it_recovers(
    faulty_server: ServerThread,
) -> None:
    address = faulty_server.address
    assert await health(address, HEALTH_NAME) == "SERVING"
    FAULT.reset("always")
    passes_before = len(FAULT.failed_input_alive)
    for i in range(4):  # one request per batch: four whole batches fail in a row
        responses = await stream_all(address, [request(GOOD[0], f"fault-{i}")])
        assert responses[0].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert await health(address, HEALTH_NAME) == "NOT_SERVING"
    assert await health(address, "") == "NOT_SERVING"  # its only model is failing
    # While failing, a batch is tried once instead of being bisected.
    batch = [request(image, f"batch-{i}") for i, image in enumerate(GOOD)]
    passes_before = len(FAULT.failed_input_alive)
    assert all(r.HasField("error") for r in await stream_all(address, batch))
    assert len(FAULT.failed_input_alive) - passes_before <= 2
    FAULT.reset("off")
    recovered = await stream_all(address, [request(GOOD[1], "after")])
    assert not recovered[0].HasField("error")
    assert await health(address, HEALTH_NAME) == "SERVING"
    assert await health(address, "") == "SERVING"


async def test_nan_logits_are_a_fault_of_that_image_alone_not_a_refusal(
    faulty_server: ServerThread,
) -> None:
    """Through the SDK: the marked image's request fails with ServerError (INTERNAL), scored or
    not, and the good requests batched with it are answered."""
    FAULT.reset("nan-marked")
    async with AsyncClient(address=faulty_server.address, retry=None, timeout=60) as client:
        calls = [
            client.explain(MARKED, model="faulty"),
            client.explain(MARKED, model="faulty", scores=["deletion_auc"]),
            *(client.explain(image, model="faulty") for image in GOOD),
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert await client.health_status(service=HEALTH_NAME) == "SERVING"  # the others worked
    for failure in outcomes[:2]:
        assert isinstance(failure, ServerError)
        assert failure.code == grpc.StatusCode.INTERNAL
        assert "logits for this image are NaN or Inf" in failure.message
        assert "not the request's" in failure.message
        assert "normalise" not in failure.message
    assert all(isinstance(o, Explanation) and o.heatmaps for o in outcomes[2:])


async def test_a_model_giving_nan_logits_goes_not_serving_and_a_probe_brings_it_back(
    probed_server: ServerThread,
) -> None:
    """Through the SDK: three batches of NaN logits turn the model NOT_SERVING (its health name,
    ModelInfo.ready, camserve_model_ready); once it computes again, the probe alone brings it
    back, with no request sent."""
    async with AsyncClient(address=probed_server.address, retry=None, timeout=30) as client:
        assert (await client.model("faulty")).ready
        FAULT.reset("nan")
        for _ in range(3):  # failing_after = 3 batches in a row, one request each
            with pytest.raises(ServerError, match="NaN") as failed:
                await client.explain(GOOD[0], model="faulty")
            assert failed.value.code == grpc.StatusCode.INTERNAL
        assert await client.health_status(service=HEALTH_NAME) == "NOT_SERVING"
        assert await client.health_status() == "NOT_SERVING"  # its only model is failing
        assert not (await client.model("faulty")).ready
        assert probed_server.metric("camserve_model_ready", model="faulty") == 0
        await asyncio.sleep(0.6)  # probes run, and fail: still failing
        assert await client.health_status(service=HEALTH_NAME) == "NOT_SERVING"
        FAULT.reset("off")  # no request is sent from here on: only the probe can notice
        for _ in range(100):
            if await client.health_status(service=HEALTH_NAME) == "SERVING":
                break
            await asyncio.sleep(0.05)
        assert await client.health_status(service=HEALTH_NAME) == "SERVING"
        assert await client.health_status() == "SERVING"
        assert (await client.model("faulty")).ready
    assert probed_server.metric("camserve_model_ready", model="faulty") == 1


async def test_unparsable_bytes_are_invalid_argument_unary_and_per_stream_item(
    faulty_server: ServerThread,
) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\xff\xff"  # a field header whose length runs past the end
    identity: Any = lambda data: data  # noqa: E731 - send raw bytes, read raw bytes
    async with grpc.aio.insecure_channel(faulty_server.address) as channel:
        unary = channel.unary_unary(
            "/camserve.v1.ExplainService/Explain",
            request_serializer=identity,
            response_deserializer=pb.ExplainResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(garbage, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not parse" in (refused.value.details() or "")
        stream = channel.stream_stream(
            "/camserve.v1.ExplainService/ExplainStream",
            request_serializer=identity,
            response_deserializer=pb.ExplainResponse.FromString,
        )
        good = request(GOOD[0], "good").SerializeToString()
        responses = [r async for r in stream(iter([garbage, good]), timeout=30)]
    assert len(responses) == 2
    codes = sorted(r.error.code for r in responses)
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    answered = next(r for r in responses if not r.HasField("error"))
    assert answered.request_id == "good"
    assert np.isfinite(answered.results[0].predictions[0].probability)
