"""Client test fixtures; the helpers themselves live in tests/_support/client_fakes.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture
def client_ports() -> Callable[[int], set[int]]:
    """Reads this host's TCP tables (Linux /proc/net/tcp and tcp6): `client_ports(port)` is the
    set of local ports of ESTABLISHED connections to 127.0.0.1:`port`, one per client connection.
    gRPC dials from dual-stack sockets, so its connections show in tcp6 as ::ffff:127.0.0.1."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("needs Linux's /proc/net/tcp")
    loopback = ("0100007F", "0000000000000000FFFF00000100007F")  # 127.0.0.1, ::ffff:127.0.0.1

    def read(port: int) -> set[int]:
        ports = set()
        for table in tables:
            lines = table.read_text().splitlines()[1:] if table.exists() else []
            for line in lines:
                local, remote, state = line.split()[1:4]
                if state == "01" and remote in {f"{ip}:{port:04X}" for ip in loopback}:
                    ports.add(int(local.rsplit(":", 1)[1], 16))  # 01: ESTABLISHED
        return ports

    return read
