"""HTTP requests in flight: past `limits.max_concurrent_rpcs` they are refused 429, and at
shutdown a started one is answered while a new one is refused 503."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from google.protobuf import json_format

from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb
from tests._support import gated_model
from tests._support.servers import ServerThread, gated_settings, png_bytes, seeded_images
from tests._support.traffic import wait_until

pytestmark = pytest.mark.timeout(120)
BODY = json_format.MessageToJson(
    pb.ExplainRequest(images=[pb.Image(encoded=png_bytes(seeded_images(1, (32, 32))[0]))])
)


async def test_a_started_request_is_answered_while_the_server_drains(
    gated_server_factory: Callable[..., ServerThread],
) -> None:
    server = gated_server_factory()
    url = f"http://127.0.0.1:{server.server.http_port}/v1/models/gated:explain"
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def explain() -> tuple[int, dict[str, str]]:
            async with http.post(url, data=BODY, headers=headers) as reply:
                return reply.status, await reply.json()

        started = asyncio.create_task(explain())
        assert await asyncio.to_thread(gated_model.ENTERED.wait, 10)
        stopping = asyncio.create_task(asyncio.to_thread(server.stop, 10.0))
        await asyncio.to_thread(wait_until, lambda: server.server.servicer._draining, 10.0)
        status, error = await explain()
        assert (status, error["status"]) == (503, "UNAVAILABLE")
        assert "server is shutting down" in error["message"]
        gated_model.GATE.set()
        status, answer = await started
        assert status == 200
        assert len(answer["results"]) == 1
        await stopping


async def test_requests_past_the_concurrency_limit_are_refused_429(
    server_factory: Callable[..., ServerThread],
) -> None:
    gated_model.GATE.set()
    limits = LimitsSettings(max_images_per_request=2, max_concurrent_rpcs=1)
    server = server_factory(models=(gated_settings(),), limits=limits, metrics_port=-1)
    gated_model.ENTERED.clear()
    gated_model.GATE.clear()
    url = f"http://127.0.0.1:{server.server.http_port}/v1/models/gated:explain"
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

            async def explain() -> tuple[int, dict[str, str], str | None]:
                async with http.post(url, data=BODY, headers=headers) as reply:
                    return reply.status, await reply.json(), reply.headers.get("Retry-After")

            started = asyncio.create_task(explain())
            assert await asyncio.to_thread(gated_model.ENTERED.wait, 10)
            status, error, retry_after = await explain()
            assert (status, error["status"], retry_after) == (429, "RESOURCE_EXHAUSTED", "1")
            assert error["message"].startswith("the server is answering 1 HTTP requests")
            gated_model.GATE.set()
            assert (await started)[0] == 200
    finally:
        gated_model.GATE.set()
