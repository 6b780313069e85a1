"""The asyncio client against a real camserve server (the shared `camserve_server` fixture)."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from PIL import Image

from camserve.client import (
    AsyncClient,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
)
from tests._support.client_fakes import CAT, CAT_CLASSES, CAT_SIZE, ESPRESSO, normalised
from tests._support.servers import CAT_BYTES, CAT_JPEG, COFFEE_JPEG


@pytest.fixture
async def client(camserve_server):
    async with AsyncClient(address=camserve_server.address, timeout=60) as client:
        yield client


async def test_every_image_form_explains_the_cat(client) -> None:
    picture = Image.open(CAT_JPEG).convert("RGB")
    forms = [CAT_JPEG, str(CAT_JPEG), CAT_BYTES, picture, np.asarray(picture)]
    results = await asyncio.gather(*(client.explain(image) for image in forms))
    assert [r.top.index for r in results] == [CAT] * len(forms)
    assert {r.heatmap().shape for r in results} == {CAT_SIZE}
    tensor = normalised(picture, await client.model("efficientnet-lite0"))
    from_tensor = await client.explain(tensor.astype(np.float32))
    assert from_tensor.top.index in CAT_CLASSES
    assert from_tensor.heatmap().shape == (224, 224)


async def test_concurrent_calls_share_batches(client) -> None:
    results = await asyncio.gather(*(client.explain(COFFEE_JPEG) for _ in range(6)))
    assert {r.top.index for r in results} == {ESPRESSO}
    assert max(r.batch_size for r in results) >= 1


async def test_explain_batch_and_many(client) -> None:
    cat, coffee = await client.explain_batch([CAT_JPEG, COFFEE_JPEG], top_k=1)
    assert (cat.top.index, coffee.top.index) == (CAT, ESPRESSO)
    images = [COFFEE_JPEG, CAT_JPEG, CAT_JPEG, COFFEE_JPEG, CAT_JPEG]
    results = [r async for r in client.explain_many(images, max_in_flight=2)]
    assert [r.top.index for r in results] == [ESPRESSO, CAT, CAT, ESPRESSO, CAT]
    mixed = [r async for r in client.explain_many([b"junk", CAT_JPEG], return_exceptions=True)]
    assert isinstance(mixed[0], InvalidArgument)
    assert mixed[1].top.index == CAT


async def test_models_and_health(client) -> None:
    assert {m.name for m in await client.models()} == {"efficientnet-lite0", "resnet18"}
    assert (await client.model("resnet18")).num_classes == 1000
    assert await client.health()
    assert await client.health_status() == "SERVING"


async def test_errors_carry_the_server_message(client) -> None:
    with pytest.raises(NotFound, match="no-such-model"):
        await client.explain(CAT_JPEG, model="no-such-model")
    with pytest.raises(InvalidArgument, match="no.such.layer"):
        await client.explain(CAT_JPEG, layer="no.such.layer")
    with pytest.raises(InvalidArgument, match="decodable"):
        await client.explain(b"not an image")
    with pytest.raises(DeadlineExceeded):
        await client.explain(CAT_JPEG, timeout=0.001)


async def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    async with AsyncClient(address=f"127.0.0.1:{port}", retry=policy, timeout=5) as client:
        with pytest.raises(Unavailable) as down:
            await client.explain(CAT_BYTES)
    assert down.value.message
