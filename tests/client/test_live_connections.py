"""`connections=N`: one client spreads its calls over N TCP connections to a real server.

HTTP/2 balances per connection, so a server with several frontend processes on one port
(SO_REUSEPORT) sees a one-channel client on one process only. The server here is one process;
what the tests count is the client's ESTABLISHED connections to its port (`client_ports`), each
with its own local port. gRPC channels connect lazily, on their first call, so the count after k
calls shows which channels the calls took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from camserve.client import AsyncClient, Client
from tests._support.servers import CAT_BYTES, ServerThread
from tests._support.traffic import tiny_model

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    """A fresh server per test, so no other test's connections are in the count."""
    return server_factory(models=(tiny_model("tiny"),), metrics_port=-1)


def settle(read: Callable[[], set[int]], expected: int, timeout: float = 5.0) -> set[int]:
    """`read()` once it holds `expected` ports (connections open and close asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(ports := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return ports


def test_unary_calls_take_the_connections_in_turn(server, client_ports) -> None:
    def ports() -> set[int]:
        return client_ports(server.port)

    with Client(address=server.address, connections=3) as client:
        assert client.connections == 3
        assert ports() == set()  # nothing connects before the first call
        seen = []
        for _ in range(3):
            assert client.explain(CAT_BYTES, model="tiny").model == "tiny"
            seen.append(len(settle(ports, len(seen) + 1)))
        assert seen == [1, 2, 3]  # each call opened the next channel's connection
        first_three = ports()
        for _ in range(3):  # the next round reuses the same three connections
            assert client.explain(CAT_BYTES, model="tiny").top.index >= 0
        assert client.health()
        assert [m.name for m in client.models()] == ["tiny"]
        assert ports() == first_three
    assert settle(ports, 0) == set()  # close() closes every connection


def test_one_connection_is_still_the_default(server, client_ports) -> None:
    with Client(address=server.address) as client:
        assert client.connections == 1
        for _ in range(3):
            client.explain(CAT_BYTES, model="tiny")
        assert len(client_ports(server.port)) == 1


def test_a_stream_stays_on_one_connection(server, client_ports) -> None:
    def ports() -> set[int]:
        return client_ports(server.port)

    with Client(address=server.address, connections=3) as client:
        results = list(client.explain_many([CAT_BYTES] * 6, model="tiny", max_in_flight=3))
        assert [r.model for r in results] == ["tiny"] * 6
        assert len(settle(ports, 1)) == 1
        assert client.health()  # the next call takes the next channel
        assert len(settle(ports, 2)) == 2


async def test_the_asyncio_client_spreads_calls_too(server, client_ports) -> None:
    def ports() -> set[int]:
        return client_ports(server.port)

    async with AsyncClient(address=server.address, connections=3) as client:
        assert client.connections == 3
        results = await asyncio.gather(*(client.explain(CAT_BYTES, model="tiny") for _ in range(6)))
        assert [r.model for r in results] == ["tiny"] * 6
        assert len(ports()) == 3
        assert await client.health()
        streamed = [r async for r in client.explain_many([CAT_BYTES] * 3, model="tiny")]
        assert len(streamed) == 3
        assert len(ports()) == 3
    assert await asyncio.to_thread(settle, ports, 0) == set()


@pytest.mark.parametrize("connections", [0, -1, 1.5, True])
def test_connections_must_be_a_whole_number_of_at_least_one(connections) -> None:
    with pytest.raises(ValueError, match="connections must be a whole number of at least 1"):
        Client(connections=connections)
    with pytest.raises(ValueError, match="connections must be a whole number of at least 1"):
        AsyncClient(connections=connections)
