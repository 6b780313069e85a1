"""Settings merge defaults < TOML < environment < CLI, and refuse what they cannot use."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from camserve.server.settings import (
    BUILTIN_MODEL,
    DEFAULT_RESIZE,
    LimitsSettings,
    ModelSettings,
    Settings,
    SettingsError,
    load_settings,
)

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
        ("[[models]]\nname='m'\nsource='builtin:x'\nfailing_after=0\n", "failing_after must be"),
        ("[[models]]\nname='m'\nsource='builtin:x'\nhealth_probe_s=-1\n", "health_probe_s=-1"),
        ("[limits]\nstream_window=0\n", "limits.stream_window=0 must be at least 1"),
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


def model(**changes: object) -> ModelSettings:
    return ModelSettings(name="m", source="builtin:efficientnet-lite0", **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Settings(models=(model(max_queue=16),)),
            "models['m'].max_queue=16 is below limits.max_images_per_request=32: a request of "
            "32 images could never be admitted and would be refused as retryable forever; "
            "raise max_queue or lower max_images_per_request",
        ),
        (
            lambda: Settings(models=(model(max_batch_size=64, max_queue=48),)),
            "models['m'].max_batch_size=64 is above max_queue=48: a batch can never hold more "
            "than the queue does; lower max_batch_size or raise max_queue",
        ),
        (
            lambda: Settings(
                models=(model(resize=1024, crop=896),),
                limits=LimitsSettings(max_resized_pixels=1_000_000),
            ),
            "models['m']: even a square image is resized to 1024x1024 = 1048576 pixels for this "
            "model, over limits.max_resized_pixels=1000000, so every image would be refused; "
            "raise max_resized_pixels or lower resize",
        ),
        (
            lambda: Settings(port=9090),
            "port and metrics_port are both 9090: the gRPC and metrics servers cannot share a "
            "port; change one, or set metrics_port = -1",
        ),
        (lambda: Settings(port=70000), "port=70000: use 0..65535 (0 picks a free port)"),
        (lambda: Settings(metrics_port=-2), "metrics_port=-2: use 0..65535"),
        (lambda: Settings(log_level="verbose"), "log_level='verbose': use one of"),
        (lambda: Settings(engine_threads=-1), "engine_threads=-1"),
        (lambda: LimitsSettings(max_pixels=63), "limits.max_pixels=63 refuses every image"),
        (lambda: LimitsSettings(max_aspect_ratio=0.5), "limits.max_aspect_ratio=0.5 must be"),
        (lambda: LimitsSettings(max_top_k=0), "limits.max_top_k=0 must be at least 1"),
        (
            lambda: LimitsSettings(max_images_per_request=0),
            "limits.max_images_per_request=0 must be at least 1",
        ),
        (lambda: LimitsSettings(max_score_steps=0), "limits.max_score_steps=0: use 1..100"),
        (lambda: LimitsSettings(max_score_steps=101), "limits.max_score_steps=101: use 1..100"),
    ],
    ids=[
        "queue-below-request",
        "batch-above-queue",
        "resize-above-resized-limit",
        "port-clash",
        "port-range",
        "metrics-port-range",
        "log-level",
        "engine-threads",
        "pixel-limit-below-smallest-image",
        "aspect-below-1",
        "top-k-0",
        "images-0",
        "score-steps-0",
        "score-steps-above-engine",
    ],
)
def test_configurations_that_cannot_work_are_refused_at_start(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        build()
    assert str(refused.value).startswith(message)


def test_an_impossible_queue_in_a_file_is_refused_with_its_keys(tmp_path: Path) -> None:
    config = tmp_path / "camserve.toml"
    config.write_text(
        "[limits]\nmax_images_per_request = 8\n"
        "[[models]]\nname = 'small'\nsource = 'builtin:efficientnet-lite0'\nmax_queue = 4\n"
        "max_batch_size = 4\n"
    )
    with pytest.raises(SettingsError, match=r"models\['small'\]\.max_queue=4 is below"):
        load_settings(["--config", str(config)], {})
    config.write_text(config.read_text().replace("max_queue = 4", "max_queue = 8"))
    settings = load_settings(["--config", str(config)], {})
    assert settings.models[0].max_queue == settings.limits.max_images_per_request == 8


def test_the_defaults_and_the_image_bounds_are_consistent() -> None:
    settings = Settings()
    assert settings.limits.max_aspect_ratio == 20.0
    assert settings.limits.max_resized_pixels == 2048 * 2048
    # The most elongated image the defaults accept, resized for the default model, fits.
    (default,) = settings.models
    resize = default.resize or DEFAULT_RESIZE
    assert resize * resize * settings.limits.max_aspect_ratio <= (
        settings.limits.max_resized_pixels
    )


def test_max_score_steps_comes_from_the_limits_table(tmp_path: Path) -> None:
    assert load_settings([], {}).limits.max_score_steps == 100
    config = tmp_path / "camserve.toml"
    config.write_text("[limits]\nmax_score_steps = 40\n")
    assert load_settings(["--config", str(config)], {}).limits.max_score_steps == 40
