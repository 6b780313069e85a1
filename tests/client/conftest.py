"""Client test fixtures; the helpers themselves live in tests/_support/client_fakes.py."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest

from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support.client_fakes import FakeService


@dataclass
class FakeServer:
    address: str
    service: FakeService


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A fresh scripted ExplainService on 127.0.0.1:PORT."""
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExplainServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield FakeServer(address=f"127.0.0.1:{port}", service=service)
    server.stop(grace=None)
