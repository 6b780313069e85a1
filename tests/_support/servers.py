"""Helpers for the test suites: servers on loopback, seeded models, test images.

Imported as `tests._support.servers` (the test folders are packages).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CAT_JPEG = EXAMPLES / "chelsea.jpg"
COFFEE_JPEG = EXAMPLES / "coffee.jpg"


class ServerThread:
    """A camserve server on a private event loop; `address` is "127.0.0.1:PORT". It runs in one
    process unless the settings ask for frontends (auto would pick them beside a GPU)."""

    def __init__(self, settings: Any) -> None:
        import dataclasses

        from camserve.server.app import start_server
        from camserve.server.settings import AUTO_FRONTENDS

        if settings.frontends == AUTO_FRONTENDS:  # the same layout on every machine: one process
            settings = dataclasses.replace(settings, frontends=0)
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="server-loop", daemon=True
        )
        self._thread.start()
        try:
            self.server = self.call(start_server(settings), timeout=180)
        except BaseException:
            self._close_loop()
            raise

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics(self) -> Any:
        return self.server.metrics

    def metric(self, name: str, **labels: str) -> float:
        """A sample's current value from the server's Prometheus registry (0 when absent)."""
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def stop(self, grace: float = 2.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace), timeout=grace + 60)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


def http_url(server: ServerThread, path: str, scheme: str = "http") -> str:
    """`path` on a test server's HTTP port."""
    return f"{scheme}://127.0.0.1:{server.server.http_port}{path}"


def seeded_model(arch: str, seed: int = 0, **kwargs: Any) -> Any:
    """A torchvision architecture with deterministic random weights, in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kwargs).eval()


CAT_BYTES = CAT_JPEG.read_bytes()
COFFEE_BYTES = COFFEE_JPEG.read_bytes()


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 HxWx3 array, so server and test decode the same pixels."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png16_bytes(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 HxW (grayscale) or HxWx3 (RGB) array, written directly: Pillow
    cannot save 16-bit RGB."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def seeded_images(count: int, size: tuple[int, int] = (96, 128), seed: int = 0) -> list[np.ndarray]:
    """Distinct uint8 RGB images: smooth random blobs, so every image explains differently."""
    rng = np.random.default_rng(seed)
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        canvas = np.zeros((height, width, 3), dtype=np.float64)
        for _ in range(4):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            radius = rng.uniform(8, 30)
            colour = rng.uniform(0, 255, size=3)
            blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
            canvas += blob[..., None] * colour
        images.append(np.clip(canvas + rng.normal(0, 8, canvas.shape), 0, 255).astype(np.uint8))
    return images


def start_server_process(
    config: Path, ready: Path, timeout_s: float = 120.0, **popen: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """Runs `python -m camserve.server --config CONFIG` on a free port, as an operator would;
    returns the process and its gRPC port once the server reports SERVING."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camserve.server",
            "--config",
            str(config),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
        ],
        env={**os.environ, "CAMSERVE_LOG_LEVEL": "warning"},
        **popen,
    )
    deadline = time.monotonic() + timeout_s
    while not (ready.exists() and ready.stat().st_size):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise AssertionError(f"server did not become ready (exit code {process.returncode})")
        time.sleep(0.05)
    return process, int(json.loads(ready.read_text())["port"])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Kills a server process that is still running (cleanup after a failed test)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def gated_settings(max_queue: int = 2) -> Any:
    """The gated model (`gated_model`): 32x32 inputs, one image per batch, no delay."""
    from camserve.server.settings import ModelSettings
    from tests._support import gated_model

    return ModelSettings(
        name="gated",
        source=gated_model.SOURCE,
        labels="",
        resize=0,
        crop=32,
        max_batch_size=1,
        max_delay_ms=0,
        max_queue=max_queue,
    )


def _bilinear_matrix(out_len: int, in_len: int) -> np.ndarray:
    """(out_len, in_len) float64 weights of a half-pixel-centred bilinear resize with clamped
    edges: the textbook definition, independent of the server's code."""
    source = np.maximum((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), in_len - 1)
    high = np.minimum(low + 1, in_len - 1)
    fraction = source - low
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.arange(out_len), low), 1.0 - fraction)
    np.add.at(matrix, (np.arange(out_len), high), fraction)
    return matrix


def onto_original_float64(
    at_input: np.ndarray, geometry: Any, size_hw: tuple[int, int]
) -> np.ndarray:
    """(K, crop h, crop w) maps over the original image at `size_hw`, in float64: the crop placed
    where it was cut from the resized image (zero elsewhere), and that image resampled."""
    top, left, height, width = geometry.crop_box
    rows, cols = geometry.resized_hw
    canvas = np.zeros((at_input.shape[0], rows, cols))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, cols)
    canvas[:, y0:y1, x0:x1] = at_input[:, y0 - top : y1 - top, x0 - left : x1 - left]
    return _bilinear_matrix(size_hw[0], rows) @ canvas @ _bilinear_matrix(size_hw[1], cols).T
