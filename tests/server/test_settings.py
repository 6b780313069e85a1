"""Settings merge defaults < TOML < environment < CLI, and refuse what they cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from camserve.server.settings import BUILTIN_MODEL, SettingsError, load_settings

TOML = """
[server]
port = 6000
metrics_port = 6001
grace_period_s = 3
[limits]
max_pixels = 1000
[[models]]
name = "resnet18"
source = "torchvision:resnet18"
weights = "w.pth"
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
max_batch_size = 4
"""


def test_defaults_serve_the_builtin_model_on_loopback() -> None:
    settings = load_settings([], {})
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert [m.name for m in settings.models] == [BUILTIN_MODEL]
    assert settings.default_model_name == BUILTIN_MODEL


def test_cli_beats_env_beats_toml(tmp_path: Path) -> None:
    config = tmp_path / "camserve.toml"
    config.write_text(TOML)
    env = {"CAMSERVE_CONFIG": str(config), "CAMSERVE_PORT": "7000", "CAMSERVE_HOST": "0.0.0.0"}
    settings = load_settings(["--port", "8000"], env)
    assert settings.port == 8000  # CLI
    assert settings.host == "0.0.0.0"  # env
    assert settings.metrics_port == 6001  # TOML
    assert settings.grace_period_s == 3
    assert settings.limits.max_pixels == 1000
    (model,) = settings.models
    assert (model.name, model.max_batch_size, model.mean) == ("resnet18", 4, (0.5, 0.5, 0.5))
    assert settings.log_level == "info"  # default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown keys ['prot']"),
        ("[[models]]\nname='m'\nsource='onnx:m'\n", "source='onnx:m'"),
        ("[[models]]\nname='m'\nsource='builtin:x'\nresize=100\n", "resize must be 0 or at least"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_with_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(["--config", str(config)], {})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="CAMSERVE_PORT"):
        load_settings([], {"CAMSERVE_PORT": "http"})
