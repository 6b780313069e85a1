"""Shared fixtures: real camserve servers on 127.0.0.1:0 and small seeded models.

A server runs on its own event loop in a background thread, so synchronous clients, asyncio
clients and subprocesses can all talk to it from the test's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CAT_JPEG = EXAMPLES / "chelsea.jpg"
COFFEE_JPEG = EXAMPLES / "coffee.jpg"


class ServerThread:
    """A camserve server on a private event loop; `address` is "127.0.0.1:PORT"."""

    def __init__(self, settings: Any) -> None:
        from camserve.server.app import start_server

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
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


def seeded_model(arch: str, seed: int = 0, **kwargs: Any) -> Any:
    """A torchvision architecture with deterministic random weights, in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kwargs).eval()


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded resnet18 saved as users save theirs: `torch.save(model.state_dict(), path)`."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(seeded_model("resnet18").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def test_settings(resnet18_weights: Path) -> Callable[..., Any]:
    """Builds Settings for a loopback test server; keyword arguments override fields."""
    from camserve.server.settings import LimitsSettings, ModelSettings, Settings

    def build(*, models: tuple[Any, ...] | None = None, limits: Any = None, **changes: Any) -> Any:
        if models is None:
            models = (
                ModelSettings(name="efficientnet-lite0", source="builtin:efficientnet-lite0"),
                ModelSettings(
                    name="resnet18",
                    source="torchvision:resnet18",
                    weights=str(resnet18_weights),
                    labels="",
                    max_batch_size=8,
                    max_delay_ms=10,
                ),
            )
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                "grace_period_s": 5.0}
        base.update(changes)
        return Settings(models=models, limits=limits or LimitsSettings(), **base)

    return build


@pytest.fixture
def server_factory(test_settings: Callable[..., Any]) -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with custom settings (see `test_settings`); all are stopped afterwards."""
    started: list[ServerThread] = []

    def start(**changes: Any) -> ServerThread:
        server = ServerThread(test_settings(**changes))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=1.0)


@pytest.fixture(scope="session")
def camserve_server(test_settings: Callable[..., Any]) -> Iterator[ServerThread]:
    """One shared server: the pretrained `efficientnet-lite0` (default) and a seeded `resnet18`."""
    server = ServerThread(test_settings())
    yield server
    server.stop(grace=1.0)
