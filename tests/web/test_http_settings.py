"""`server.http_port` and `server.http_cors_origins`: merged like every [server] key, checked,
and the bound port written to the ready file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from camserve.server.settings import LimitsSettings, Settings, SettingsError, load_settings
from tests._support.servers import ServerThread, gated_settings

SMALL = LimitsSettings(max_images_per_request=2)  # the gated model's queue holds 2


def test_the_http_port_defaults_to_8080_and_merges_like_every_server_key(tmp_path: Path) -> None:
    assert load_settings([], {}).http_port == 8080
    config = tmp_path / "camserve.toml"
    config.write_text('[server]\nhttp_port = 8100\nhttp_cors_origins = "https://a.example"\n')
    assert load_settings(["--config", str(config)], {}).http_port == 8100
    env = {"CAMSERVE_CONFIG": str(config), "CAMSERVE_HTTP_PORT": "8200"}
    settings = load_settings([], env)
    assert settings.http_port == 8200
    assert settings.cors_origins == ("https://a.example",)
    assert load_settings(["--http-port", "-1"], env).http_port == -1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"http_port": -2}, "http_port=-2: use 0..65535 (0 picks a free port) or -1 to disable"),
        ({"http_port": 50051}, "http_port and port are both 50051"),
        ({"http_port": 9090}, "http_port and metrics_port are both 9090"),
        ({"http_cors_origins": "dashboard.example"}, "'dashboard.example' is not an origin"),
    ],
)
def test_unusable_http_settings_are_refused(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(**changes)
    assert words in str(caught.value)


def test_the_bound_http_port_is_in_the_ready_file(
    server_factory: Callable[..., ServerThread], tmp_path: Path
) -> None:
    ready = tmp_path / "ready.json"
    served = server_factory(
        models=(gated_settings(),), limits=SMALL, metrics_port=-1, ready_file=str(ready)
    )
    port = served.server.http_port
    assert port
    assert port != served.port
    assert json.loads(ready.read_text())["http_port"] == port

    off = tmp_path / "off.json"
    disabled = server_factory(
        models=(gated_settings(),), limits=SMALL, metrics_port=-1, http_port=-1, ready_file=str(off)
    )
    assert disabled.server.http is None
    assert json.loads(off.read_text())["http_port"] is None
