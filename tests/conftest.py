"""Shared fixtures: real camserve servers on 127.0.0.1:0 and small seeded models.

A server runs on its own event loop in a background thread, so synchronous clients, asyncio
clients and subprocesses can all talk to it from the test's thread. Tests marked `gpu` are
skipped here when no CUDA device is present (`-m gpu` selects them on a GPU machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._support import gated_model
from tests._support.servers import ServerThread, gated_settings, seeded_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips the `gpu` tests without a CUDA device (torch is imported only if there are any)."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in marked:
        item.add_marker(skip)


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
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": 0,
            "http_port": 0,
            "grace_period_s": 5.0,
            # One process unless a test asks for the multi-process layout (auto would pick it
            # beside a GPU).
            "frontends": 0,
        }
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


@pytest.fixture(scope="session")
def camserve_processes(test_settings: Callable[..., Any]) -> Iterator[ServerThread]:
    """The same models as `camserve_server` in the multi-process layout: a supervisor, one
    engine process and two gRPC frontends on one port."""
    server = ServerThread(test_settings(frontends=2))
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def gated_server_factory(
    server_factory: Callable[..., ServerThread],
) -> Iterator[Callable[..., ServerThread]]:
    """Starts a server whose only model, "gated", blocks in its forward pass until the test
    opens `gated_model.GATE`; the gate is closed once the server serves."""

    def start(max_queue: int = 2, frontends: int = 0) -> ServerThread:
        from camserve.server.settings import LimitsSettings

        gated_model.GATE.set()  # the warm-up pass must get through
        server = server_factory(
            models=(gated_settings(max_queue),),
            metrics_port=-1,
            frontends=frontends,
            # A request may hold no more images than the queue (settings refuse otherwise).
            limits=LimitsSettings(max_images_per_request=max_queue),
        )
        gated_model.ENTERED.clear()
        gated_model.GATE.clear()
        return server

    yield start
    gated_model.GATE.set()  # before server_factory stops the servers


@pytest.fixture(scope="session")
def deit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded timm DeiT-Tiny (distillation token) saved as .safetensors, as a timm user would
    save a fine-tune: `safetensors.torch.save_file(model.state_dict(), path)`."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "deit_tiny_distilled.safetensors"
    save_file(model.state_dict(), str(path))
    return path
