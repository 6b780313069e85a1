"""Helpers shared by the reliability and security suites.

The small models keep every suite fast on a two-core CPU: a resnet18 at a 64x64 input, and a
ten-class network that loads in milliseconds.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from torch import nn

from camserve.server.settings import ModelSettings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import from_proto

TINY_SOURCE = "factory:tests._support.traffic:tiny_net"
TINY_CLASSES = 10


class TinyNet(nn.Module):
    """conv -> relu -> conv -> relu -> pool -> linear: ten classes, negligible compute."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, TINY_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_net() -> nn.Module:
    """The factory behind `TINY_SOURCE`: deterministic weights."""
    torch.manual_seed(0)
    return TinyNet()


SMOOTH_SOURCE = "factory:tests._support.traffic:smooth_net"


def smooth_net() -> nn.Module:
    """The tiny network with SiLU for its second ReLU: guided backprop has no rule for it."""
    net = tiny_net()
    net.features[3] = nn.SiLU()
    return net


def small_resnet(weights: Path | str, name: str = "resnet18", **changes: Any) -> ModelSettings:
    """The seeded resnet18 at a 64x64 input (resized straight to the crop)."""
    values: dict[str, Any] = {
        "name": name,
        "source": "torchvision:resnet18",
        "weights": str(weights),
        "labels": "",
        "resize": 0,
        "crop": 64,
        "max_batch_size": 8,
        "max_delay_ms": 2,
    }
    values.update(changes)
    return ModelSettings(**values)


def tiny_model(name: str = "tiny", **changes: Any) -> ModelSettings:
    """The ten-class network at a 32x32 input."""
    values: dict[str, Any] = {
        "name": name,
        "source": TINY_SOURCE,
        "labels": "",
        "resize": 0,
        "crop": 32,
        "max_batch_size": 8,
        "max_delay_ms": 2,
    }
    values.update(changes)
    return ModelSettings(**values)


def health_status(address: str, timeout: float = 10.0) -> int:
    """The grpc.health.v1 status of the whole server (a HealthCheckResponse.ServingStatus)."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    return int(reply.status)


SERVING = int(health_pb2.HealthCheckResponse.SERVING)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Polls `condition` (state owned by another thread) until true; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def assert_same_explanation(
    got: pb.ExplainResponse, expected: pb.ExplainResponse, atol: float = 1e-5
) -> None:
    """Same predicted classes and heatmaps (up to float noise from different batch sizes)."""
    assert len(got.results) == len(expected.results)
    for mine, reference in zip(got.results, expected.results, strict=True):
        assert [p.index for p in mine.predictions] == [p.index for p in reference.predictions]
        assert [(h.method, h.class_index) for h in mine.heatmaps] == [
            (h.method, h.class_index) for h in reference.heatmaps
        ]
        for a, b in zip(mine.heatmaps, reference.heatmaps, strict=True):
            np.testing.assert_allclose(from_proto(a.data), from_proto(b.data), atol=atol)


class GoodTraffic:
    """Keeps sending one known-good request from a background thread and checks each answer.

    Bad requests are sent while this runs, so a bad one that disturbed the batch, the queue or
    the worker threads shows up here as a failed or wrong answer to a good one.
    """

    def __init__(self, address: str, request: pb.ExplainRequest) -> None:
        self._channel = grpc.insecure_channel(address)
        self._explain = pb_grpc.ExplainServiceStub(self._channel).Explain
        self._request = request
        self.reference: pb.ExplainResponse = self._explain(request, timeout=60)
        self.answered = 0
        self.failures: list[str] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)

    def __enter__(self) -> GoodTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self._explain(self._request, timeout=30)
                assert_same_explanation(reply, self.reference)
            except (grpc.RpcError, AssertionError) as exc:
                self.failures.append(repr(exc)[:500])
            with self._changed:
                self.answered += 1
                self._changed.notify_all()

    def wait_for_more(self, count: int = 2, timeout: float = 30.0) -> None:
        """Waits until `count` more good requests have been answered (and checked)."""
        with self._changed:
            target = self.answered + count
            if not self._changed.wait_for(lambda: self.answered >= target, timeout):
                raise AssertionError(f"good traffic stalled at {self.answered} answers")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte valid-looking RGB PNG whose header declares `width` x `height` pixels.

    The one IDAT chunk holds a single compressed row, so a decoder that trusted the header would
    allocate the whole declared image before finding out the data is missing.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def encoded(image: np.ndarray | Image.Image, kind: str = "PNG", **save: Any) -> bytes:
    """`image` (an array or a PIL image of any mode PIL can save) as `kind` file bytes."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format=kind, **save)
    return buffer.getvalue()


def vm_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc status")
