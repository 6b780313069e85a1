"""The server's one frozen settings object, merged from defaults, a TOML file, env and CLI flags.

Precedence, lowest to highest: built-in defaults, the TOML file (`--config` or `CAMSERVE_CONFIG`),
`CAMSERVE_*` environment variables, command-line flags. Nothing else in the server reads the
environment or the command line: everything flows from the `Settings` built here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_MODEL = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METRICS_DISABLED = -1
HTTP_DISABLED = -1
AUTO_FRONTENDS = -1
MAX_AUTO_FRONTENDS = 8
MIN_IMAGE_SIDE = 8  # pixels; smaller images are refused
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The input recipe of builtin, torchvision and factory sources; timm sources bring their own.
DEFAULT_RESIZE = 256
DEFAULT_CROP = 224
SOURCE_KINDS = ("builtin", "torchvision", "timm", "factory")
LAYER_LAYOUTS = ("nchw", "nhwc", "tokens")
# The most steps the engine runs for a deletion or insertion curve (engine.faithfulness.MAX_STEPS,
# kept equal by a test; this module stays torch-free).
ENGINE_MAX_SCORE_STEPS = 100


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelSettings:
    """One hosted model: where it comes from, how its inputs are made, how it is batched."""

    name: str
    source: str  # "builtin:NAME", "torchvision:ARCH", "timm:NAME" or "factory:pkg.module:function"
    weights: str = ""  # state dict (.pt/.pth, weights_only) or .safetensors; builtin: ignored
    labels: str = "imagenet"  # "imagenet", or a text file with one label per line
    version: str = "1"
    device: str = "auto"  # auto = CUDA when present, else CPU
    precision: str = "float32"  # float32 | bfloat16 | float16 (weights cast once; float16: CUDA)
    default_layer: str = ""  # empty: detected (see camserve.server.engine)
    num_classes: int = 0  # torchvision and timm sources: 0 = infer from the weights
    # Shorter side before the centre crop (0 = resize straight to crop x crop) and the crop; None
    # takes the source's own: timm's pretrained config for timm sources, else 256 and 224.
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = ()  # empty: the source's own (ImageNet's for torchvision)
    std: tuple[float, ...] = ()
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    # Wait longer than max_delay_ms while items arrive fast enough to fill the batch within half
    # a batch's compute time (camserve.server.batcher); false: max_delay_ms alone.
    adaptive_delay: bool = True
    max_queue: int = 256
    # Rows per pass whose gradient at the input is taken (pixel attributions, SmoothGrad's copies,
    # IG's points): they keep the whole network's activations, so they get their own bound.
    max_gradient_rows: int = 16
    # Health: this many batches in a row that fail with a fault turn the model NOT_SERVING; while
    # failing it is probed with one image every health_probe_s (0 = only requests bring it back).
    failing_after: int = 3
    health_probe_s: float = 5.0
    # How layers hold their maps, detected unless set (see camserve.server.engine.layouts):
    # per-layer "nchw" | "nhwc" | "tokens"; tokens before the patch grid (-1 = from the model);
    # the (h, w) patch grid of token layers (empty = from the model and the input size).
    layer_layouts: tuple[tuple[str, str], ...] = ()
    prefix_tokens: int = -1
    token_grid: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"models[{self.name!r}]"
        if not self.name:
            raise SettingsError("every [[models]] entry needs a non-empty `name`")
        kind = self.source.split(":", 1)[0]
        if kind not in SOURCE_KINDS or ":" not in self.source:
            raise SettingsError(
                f"{where}.source={self.source!r}: use 'builtin:efficientnet-lite0', "
                "'torchvision:ARCH' or 'timm:NAME' (with `weights`), or "
                "'factory:package.module:function'"
            )
        if self.precision not in ("float32", "bfloat16", "float16"):
            raise SettingsError(f"{where}.precision={self.precision!r}: float32|bfloat16|float16")
        if (self.mean or self.std) and (
            len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std)
        ):
            raise SettingsError(f"{where}: mean and std need 3 values each, std > 0")
        for key in ("max_batch_size", "max_queue", "failing_after", "max_gradient_rows"):
            if getattr(self, key) < 1:
                raise SettingsError(f"{where}.{key} must be at least 1")
        if self.crop is not None and self.crop < 1:
            raise SettingsError(f"{where}.crop must be at least 1")
        if self.resize is not None and self.resize < 0:
            raise SettingsError(f"{where}.resize must be 0 or at least crop")
        if self.max_delay_ms < 0:
            raise SettingsError(f"{where}.max_delay_ms must not be negative")
        if not self.health_probe_s >= 0:
            raise SettingsError(
                f"{where}.health_probe_s={self.health_probe_s}: use 0 (no probe: requests alone "
                "bring a failing model back) or the seconds between probes"
            )
        # timm sources learn their crop from timm when it is not set; the loader checks those.
        crop = self.crop if self.crop is not None else (None if kind == "timm" else DEFAULT_CROP)
        if self.resize and crop is not None and self.resize < crop:
            raise SettingsError(f"{where}.resize must be 0 or at least crop ({crop})")
        self._check_layouts(where)

    def _check_layouts(self, where: str) -> None:
        for layer, layout in self.layer_layouts:
            if layout not in LAYER_LAYOUTS:
                raise SettingsError(
                    f"{where}.layer_layouts[{layer!r}]={layout!r}: use one of "
                    f"{', '.join(LAYER_LAYOUTS)} (nhwc: channels-last maps such as Swin stages; "
                    "tokens: (N, tokens, C) sequences)"
                )
        if self.prefix_tokens < -1:
            raise SettingsError(
                f"{where}.prefix_tokens={self.prefix_tokens}: use -1 (taken from the model) or "
                "the number of tokens before the patch grid (class, distillation, register)"
            )
        if self.token_grid and (len(self.token_grid) != 2 or min(self.token_grid) < 1):
            raise SettingsError(
                f"{where}.token_grid={list(self.token_grid)}: use [height, width] of the patch "
                "grid at the model's input size (input size / patch size), or omit it"
            )


@dataclass(frozen=True)
class LimitsSettings:
    """Per-request bounds that keep one caller from exhausting the server.

    Image geometry is bounded three ways, all checked from the file header before any pixel is
    decoded: `max_pixels` bounds the decoded image; `max_aspect_ratio` (longer side over shorter
    side) keeps a thin strip from becoming huge once its shorter side is resized to the model's
    `resize` (an 8x4000 PNG would become 256x128000); `max_resized_pixels` bounds that resized
    image itself, whatever the model's `resize`.
    """

    max_images_per_request: int = 32
    max_pixels: int = 40_000_000  # decoded image size; larger files are refused before decoding
    max_aspect_ratio: float = 20.0  # longer side / shorter side of an image
    max_resized_pixels: int = 4_194_304  # an image resized for a model, before the crop (2048^2)
    max_output_pixels: int = 16_777_216  # per heatmap (4096 x 4096)
    # What shaping one request's heatmaps may allocate, intermediates included (output_bytes).
    max_request_output_bytes: int = 1_073_741_824
    max_concurrent_streams: int = 256  # HTTP/2 streams per connection
    # RPCs in progress at once, all connections together; more are refused RESOURCE_EXHAUSTED by
    # gRPC before any work, so a flood cannot queue unbounded handlers and decoding.
    max_concurrent_rpcs: int = 512
    max_top_k: int = 20  # classes explained per image
    # Steps of a deletion or insertion curve a request may ask for (output.score_steps): each step
    # is a forward row per map and curve, so this bounds what one scored map can cost.
    max_score_steps: int = ENGINE_MAX_SCORE_STEPS
    # SmoothGrad's copies and Integrated Gradients' steps a request may ask for per image: each
    # is a row with its gradient at the input (saliency.samples, saliency.steps).
    max_saliency_rows: int = 200
    max_kernel_tiles: int = 1024  # tiles on one page of a kernel grid (GetKernels)
    max_kernel_tile_size: int = 128  # pixels per side of one kernel tile
    # Feature maps in an explain request: layers per request, and channels returned per layer.
    max_feature_layers: int = 8
    max_feature_channels: int = 64
    # Requests of one ExplainStream read and not yet answered: the server reads no further ahead,
    # and holds at most this many answers for a caller that stops reading.
    stream_window: int = 64

    def __post_init__(self) -> None:
        for key in (
            "max_images_per_request",
            "max_pixels",
            "max_resized_pixels",
            "max_output_pixels",
            "max_concurrent_streams",
            "max_top_k",
            "max_saliency_rows",
            "max_kernel_tiles",
            "max_kernel_tile_size",
            "max_feature_layers",
            "max_feature_channels",
            "stream_window",
        ):
            if getattr(self, key) < 1:
                raise SettingsError(f"limits.{key}={getattr(self, key)} must be at least 1")
        smallest = MIN_IMAGE_SIDE * MIN_IMAGE_SIDE
        if self.max_pixels < smallest:
            raise SettingsError(
                f"limits.max_pixels={self.max_pixels} refuses every image: the smallest accepted "
                f"image is {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} = {smallest} pixels"
            )
        if not self.max_aspect_ratio >= 1:
            raise SettingsError(
                f"limits.max_aspect_ratio={self.max_aspect_ratio} must be at least 1 (square)"
            )
        if not 1 <= self.max_score_steps <= ENGINE_MAX_SCORE_STEPS:
            raise SettingsError(
                f"limits.max_score_steps={self.max_score_steps}: use 1..{ENGINE_MAX_SCORE_STEPS} "
                f"(the engine runs at most {ENGINE_MAX_SCORE_STEPS} steps per curve)"
            )


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to run; immutable once built."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090  # 0 = ephemeral, -1 = disabled
    # The HTTP/JSON API and the web page (camserve.server.web); 0 = ephemeral, -1 = disabled.
    http_port: int = 8080
    # Origins (comma-separated, e.g. "https://a.example,https://b.example") whose pages may call
    # the HTTP API from a browser; empty: CORS off, only the page served here may.
    http_cors_origins: str = ""
    grace_period_s: float = 20.0
    max_message_mb: int = 64
    log_level: str = "info"
    log_format: str = "text"  # text | json
    default_model: str = ""  # empty: the first model
    auth_token_file: str = ""  # when set, calls need "authorization: Bearer <token>"
    auth_token: str = ""  # the token itself (prefer the file; env CAMSERVE_AUTH_TOKEN)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # when set, clients must present a certificate signed by it
    ready_file: str = ""  # JSON with the bound ports, written once serving
    warmup: bool = True
    engine_threads: int = 0  # torch intra-op threads; 0 = torch's default
    # CPU pool for decoding, resizing, shaping and encoding; 0 = one per usable core, at most
    # 4 (more threads than cores only trade the GIL back and forth).
    preprocess_threads: int = 0
    # The process layout (camserve.server.supervisor): N gRPC frontend processes on one port and
    # one engine process holding the models; 0 = everything in one process; -1 = auto (CUDA: one
    # per core less one, at most 8; CPU: 0, which measured best there, see README).
    frontends: int = AUTO_FRONTENDS
    # Each frontend's two shared-memory rings (pixels in, maps out), MiB each.
    shm_ring_mb: int = 64
    # Connections older than this are closed (gracefully) so clients reconnect and rebalance
    # over the frontends; 0 = never.
    max_connection_age_s: float = 0.0
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    models: tuple[ModelSettings, ...] = ()

    def __post_init__(self) -> None:
        if not self.models:
            object.__setattr__(
                self,
                "models",
                (ModelSettings(name=BUILTIN_MODEL, source=f"builtin:{BUILTIN_MODEL}"),),
            )
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise SettingsError(f"model names must be unique, got {names}")
        if self.default_model and self.default_model not in names:
            raise SettingsError(f"default_model={self.default_model!r} is not one of {names}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingsError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format={self.log_format!r}: use 'text' or 'json'")
        if self.max_message_mb < 1 or self.grace_period_s < 0 or self.preprocess_threads < 0:
            raise SettingsError(
                "max_message_mb must be >= 1, preprocess_threads >= 0 (0: one per core), "
                "grace_period_s >= 0"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(f"log_level={self.log_level!r}: use one of {list(LOG_LEVELS)}")
        if self.engine_threads < 0:
            raise SettingsError(
                f"engine_threads={self.engine_threads}: use 0 (torch's default) or a thread count"
            )
        self._check_ports()
        self._check_layout()
        for model in self.models:
            self._check_model_fits_limits(model)

    def _check_ports(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port={self.port}: use 0..65535 (0 picks a free port)")
        if not METRICS_DISABLED <= self.metrics_port <= 65535:
            raise SettingsError(
                f"metrics_port={self.metrics_port}: use 0..65535 (0 picks a free port) or -1 "
                "to disable metrics"
            )
        if self.port and self.port == self.metrics_port:
            raise SettingsError(
                f"port and metrics_port are both {self.port}: the gRPC and metrics servers "
                "cannot share a port; change one, or set metrics_port = -1"
            )
        if not HTTP_DISABLED <= self.http_port <= 65535:
            raise SettingsError(
                f"http_port={self.http_port}: use 0..65535 (0 picks a free port) or -1 to "
                "disable the HTTP API and web page"
            )
        for other in ("port", "metrics_port"):
            if self.http_port > 0 and self.http_port == getattr(self, other):
                raise SettingsError(
                    f"http_port and {other} are both {self.http_port}: each server needs its "
                    "own port; change one, or set http_port = -1"
                )
        for origin in self.cors_origins:
            if origin != "*" and "://" not in origin:
                raise SettingsError(
                    f"http_cors_origins: {origin!r} is not an origin; write scheme://host[:port] "
                    "such as https://dashboard.example, or * for any origin"
                )

    def _check_layout(self) -> None:
        if self.frontends < AUTO_FRONTENDS:
            raise SettingsError(
                f"frontends={self.frontends}: use -1 (auto), 0 (one process) or the number of "
                "gRPC frontend processes"
            )
        if self.shm_ring_mb < 1:
            raise SettingsError(f"shm_ring_mb={self.shm_ring_mb} must be at least 1 (MiB)")
        if not self.max_connection_age_s >= 0:
            raise SettingsError(
                f"max_connection_age_s={self.max_connection_age_s}: use 0 (never) or seconds"
            )

    def resolved_frontends(self, cuda: bool) -> int:
        """The frontend count to run: `frontends`, or for auto one per core less one (at most
        8) beside a GPU, and the one-process layout on the CPU."""
        if self.frontends != AUTO_FRONTENDS:
            return self.frontends
        if not cuda:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(MAX_AUTO_FRONTENDS, (cores or 1) - 1))

    def _check_model_fits_limits(self, model: ModelSettings) -> None:
        """Refuses a model no request could use as configured, with the keys to change."""
        where = f"models[{model.name!r}]"
        limit = self.limits.max_images_per_request
        if model.max_queue < limit:
            raise SettingsError(
                f"{where}.max_queue={model.max_queue} is below "
                f"limits.max_images_per_request={limit}: a request of {limit} images could "
                "never be admitted and would be refused as retryable forever; raise max_queue or "
                "lower max_images_per_request"
            )
        if model.max_batch_size > model.max_queue:
            raise SettingsError(
                f"{where}.max_batch_size={model.max_batch_size} is above "
                f"max_queue={model.max_queue}: a batch can never hold more than the queue does; "
                "lower max_batch_size or raise max_queue"
            )
        # timm sources without a configured crop take timm's; the loader checks those.
        unset = 0 if model.source.startswith("timm:") else DEFAULT_CROP
        side = model.resize or model.crop or unset
        if side * side > self.limits.max_resized_pixels:
            raise SettingsError(
                f"{where}: even a square image is resized to {side}x{side} = {side * side} pixels "
                f"for this model, over limits.max_resized_pixels="
                f"{self.limits.max_resized_pixels}, so every image would be refused; raise "
                "max_resized_pixels or lower resize"
            )

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    @property
    def pool_threads(self) -> int:
        """The CPU pool's size: `preprocess_threads`, or one per usable core, at most 4."""
        if self.preprocess_threads:
            return self.preprocess_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(4, cores or 1))

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """The origins of `http_cors_origins`, without blanks."""
        return tuple(o.strip().rstrip("/") for o in self.http_cors_origins.split(",") if o.strip())

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


# Scalar server keys that may come from the environment, with their types.
_ENV_KEYS: dict[str, type] = {
    "host": str,
    "port": int,
    "metrics_port": int,
    "http_port": int,
    "http_cors_origins": str,
    "grace_period_s": float,
    "max_message_mb": int,
    "log_level": str,
    "log_format": str,
    "default_model": str,
    "auth_token_file": str,
    "auth_token": str,
    "tls_cert_file": str,
    "tls_key_file": str,
    "tls_client_ca_file": str,
    "ready_file": str,
    "engine_threads": int,
    "preprocess_threads": int,
    "frontends": int,
    "shm_ring_mb": int,
    "max_connection_age_s": float,
}


def _coerce(key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"{key}={value!r} is not a valid {kind.__name__}") from None


def _check_keys(given: Mapping[str, Any], known: set[str], where: str) -> None:
    if bad := set(given) - known:
        raise SettingsError(f"{where}: unknown keys {sorted(bad)}; known keys: {sorted(known)}")


def _from_mapping(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Turns parsed TOML into Settings keyword arguments, refusing unknown keys."""
    known_server = {f.name for f in dataclasses.fields(Settings)} - {"limits", "models"}
    unknown_top = set(data) - {"server", "limits", "models"}
    if unknown_top:
        raise SettingsError(f"{source}: unknown sections {sorted(unknown_top)}")
    server = dict(data.get("server", {}))
    _check_keys(server, known_server, f"{source} [server]")
    known_limits = {f.name for f in dataclasses.fields(LimitsSettings)}
    limits = dict(data.get("limits", {}))
    _check_keys(limits, known_limits, f"{source} [limits]")
    known_model = {f.name for f in dataclasses.fields(ModelSettings)}
    models = []
    for entry in data.get("models", []):
        _check_keys(entry, known_model, f"{source} [[models]]")
        entry = dict(entry)
        for key in ("mean", "std"):
            if key in entry:
                entry[key] = tuple(float(v) for v in entry[key])
        if "token_grid" in entry:
            entry["token_grid"] = tuple(entry["token_grid"])
        if "layer_layouts" in entry:
            layouts = entry["layer_layouts"]
            if not isinstance(layouts, Mapping):
                raise SettingsError(
                    f"{source} [[models]] {entry.get('name', '')!r}: layer_layouts must be a "
                    'table of layer = layout, e.g. layer_layouts = { "norm" = "nhwc" }'
                )
            entry["layer_layouts"] = tuple(layouts.items())
        models.append(ModelSettings(**entry))
    result: dict[str, Any] = dict(server)
    result["limits"] = LimitsSettings(**limits)
    if models:
        result["models"] = tuple(models)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camserve-server",
        description="Serve Grad-CAM explanations of PyTorch image classifiers over gRPC.",
    )
    parser.add_argument("--config", help="TOML file (env CAMSERVE_CONFIG)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port; 0 picks a free one (default 50051)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus HTTP port; 0 picks one, -1 disables"
    )
    parser.add_argument(
        "--http-port", type=int, help="HTTP/JSON API and web page port; 0 picks one, -1 disables"
    )
    parser.add_argument("--log-level", help="debug|info|warning|error")
    parser.add_argument("--grace-period", dest="grace_period_s", type=float, help="seconds")
    parser.add_argument("--ready-file", help="write the bound ports here as JSON once serving")
    parser.add_argument("--default-model", help="model used when a request names none")
    parser.add_argument(
        "--frontends",
        type=int,
        help="gRPC frontend processes beside one engine process; 0 = one process, -1 = auto",
    )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Builds Settings from CLI flags `argv`, environment `env` and the TOML file they name."""
    env = {} if env is None else env
    args = _parser().parse_args(argv)
    config = args.config or env.get("CAMSERVE_CONFIG", "")
    values: dict[str, Any] = {}
    if config:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read config file {config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config} is not valid TOML: {exc}") from None
        values.update(_from_mapping(data, config))
    for key, kind in _ENV_KEYS.items():
        raw = env.get(f"CAMSERVE_{key.upper()}")
        if raw is not None and raw != "":
            values[key] = _coerce(f"CAMSERVE_{key.upper()}", raw, kind)
    for key in (
        "host",
        "port",
        "metrics_port",
        "http_port",
        "log_level",
        "grace_period_s",
        "ready_file",
        "default_model",
        "frontends",
    ):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    return Settings(**values)
