"""Everything around Explain: model listing, health, reflection, metrics over HTTP, the stream."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from camserve.server.app import CamServer
from camserve.server.settings import ModelSettings, Settings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.methods import METHOD_BY_NAME
from tests._support import gated_model
from tests._support.servers import CAT_BYTES, COFFEE_BYTES


@pytest.fixture(scope="module", params=["one-process", "frontends-2"])
def surface(request: pytest.FixtureRequest) -> Any:
    """The shared server in each process layout: one process, and a supervisor with an engine
    process and two gRPC frontends (whose /metrics aggregates every process)."""
    name = "camserve_server" if request.param == "one-process" else "camserve_processes"
    return request.getfixturevalue(name)


async def test_models_describe_inputs_layers_and_methods(surface: Any) -> None:
    async with grpc.aio.insecure_channel(surface.address) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        listed = await stub.ListModels(pb.ListModelsRequest())
        resnet = await stub.GetModel(pb.GetModelRequest(name="resnet18"))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetModel(pb.GetModelRequest(name="alexnet"))
    assert [m.name for m in listed.models] == ["efficientnet-lite0", "resnet18"]
    lite = listed.models[0]
    assert lite.ready
    assert lite.num_classes == 1000
    assert lite.labels[285] == "Egyptian cat"
    assert lite.default_layer == "head"
    assert (lite.input.height, lite.input.resize) == (224, 256)
    assert list(lite.input.mean) == pytest.approx([127 / 255] * 3)
    assert list(lite.methods) == list(METHOD_BY_NAME.values())
    layers = {layer.name: list(layer.output_shape) for layer in resnet.layers}
    assert resnet.default_layer == "layer4"
    assert layers["layer4"] == [512, 7, 7]
    assert "layer4.1.relu" not in layers, "modules called twice per forward cannot be targets"
    assert list(resnet.input.mean) == pytest.approx([0.485, 0.456, 0.406])
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "available: efficientnet-lite0, resnet18" in (missing.value.details() or "")
    assert_method_costs(resnet, channels=512)


def assert_method_costs(info: pb.ModelInfo, channels: int) -> None:
    """One cost per method at the default layer: the gradient methods one row and one forward
    pass; ScoreCAM a whole forward per channel; AblationCAM as many rows, but only the tail;
    pixel attributions two forward passes per row (the backward to the input), SmoothGrad's 25
    copies and IG's 50 steps and baseline after their explain row. Both models are ReLU or ReLU6
    networks, so every method is listed, the guided ones too."""
    costs = {cost.method: cost for cost in info.method_costs}
    assert list(costs) == list(METHOD_BY_NAME.values())
    after_pass = {"smoothgrad": 25, "integrated_gradients": 51}
    for name, value in METHOD_BY_NAME.items():
        cost = (costs[value].rows_per_image, costs[value].forward_passes)
        if name in after_pass:
            assert cost == (1 + after_pass[name], 1.0 + 2 * after_pass[name])
        elif name in ("saliency", "input_x_gradient", "guided_backprop", "guided_gradcam"):
            assert cost == (1, 2.0)
        elif name not in ("ablationcam", "scorecam"):
            assert cost == (1, 1.0)
    score, ablation = costs[pb.METHOD_SCORECAM], costs[pb.METHOD_ABLATIONCAM]
    assert score.rows_per_image == ablation.rows_per_image == 1 + channels
    assert score.forward_passes == 1 + channels
    assert 1 < ablation.forward_passes < score.forward_passes


async def test_health_and_reflection(surface: Any) -> None:
    async with grpc.aio.insecure_channel(surface.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "camserve.v1.ExplainService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in reflect for s in r.list_services_response.service]
    assert "camserve.v1.ExplainService" in services


async def test_metrics_endpoint_serves_prometheus_text(surface: Any) -> None:
    async with grpc.aio.insecure_channel(surface.address) as channel:
        await pb_grpc.ExplainServiceStub(channel).Explain(
            pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES)])
        )
    port = surface.server.metrics_port
    url = f"http://127.0.0.1:{port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    for name in (
        "camserve_requests_total",
        "camserve_batch_size_bucket",
        "camserve_latency_seconds_bucket",
        "camserve_queue_depth",
        "camserve_images_total",
        "camserve_model_ready",
    ):
        assert name in text
    stages = {
        sample.labels["stage"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "camserve_stage_cpu_seconds_total"
    }
    for stage in ("decode", "preprocess", "compute", "shape", "respond"):
        assert stages[stage] > 0, stage  # every stage of the serving path was timed


async def test_stream_answers_each_request_by_id_and_isolates_bad_ones(
    surface: Any,
) -> None:
    requests = [
        pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES)], request_id="cat"),
        pb.ExplainRequest(images=[pb.Image(encoded=b"garbage")], request_id="bad"),
        pb.ExplainRequest(model="nope", images=[pb.Image(encoded=CAT_BYTES)], request_id="lost"),
        pb.ExplainRequest(images=[pb.Image(encoded=COFFEE_BYTES)], request_id="coffee"),
    ]

    async def send() -> Any:
        for request in requests:
            yield request

    async with grpc.aio.insecure_channel(surface.address) as channel:
        stream = pb_grpc.ExplainServiceStub(channel).ExplainStream(send())
        replies = {reply.request_id: reply async for reply in stream}
    assert set(replies) == {"cat", "bad", "lost", "coffee"}
    assert replies["cat"].results[0].predictions[0].index in range(281, 286)
    assert replies["coffee"].results[0].predictions[0].index == 967
    assert replies["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images[0].encoded" in replies["bad"].error.message
    assert replies["lost"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not replies["cat"].HasField("error")


async def test_health_is_not_serving_until_models_are_loaded() -> None:
    """While the warm-up pass is held at the gate, health says NOT_SERVING and Explain says the
    model is loading (UNAVAILABLE); once it finishes, SERVING."""
    gated_model.GATE.clear()
    gated_model.ENTERED.clear()
    model = ModelSettings(name="gated", source=gated_model.SOURCE, labels="")
    server = CamServer(Settings(port=0, metrics_port=-1, http_port=0, models=(model,)))
    starting = asyncio.create_task(server.start())
    try:
        await asyncio.to_thread(gated_model.ENTERED.wait, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            before = await health.Check(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await pb_grpc.ExplainServiceStub(channel).Explain(
                    pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES)])
                )
            gated_model.GATE.set()
            await starting
            after = await health.Check(health_pb2.HealthCheckRequest())
    finally:
        gated_model.GATE.set()
        await server.stop(1.0)
    assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "still loading" in (loading.value.details() or "")
    assert after.status == health_pb2.HealthCheckResponse.SERVING
