"""The `camserve` command: explain images into PNG files, list models, check health.

Exit status: 0 success, 1 the server refused or failed (message on stderr), 2 usage error.
The server address comes from --server, else the CAMSERVE_SERVER environment variable, else
127.0.0.1:50051; this module is the only place the client reads the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from camserve.client.connection import DEFAULT_ADDRESS, TLSConfig
from camserve.client.errors import CamserveError
from camserve.client.health import SERVING
from camserve.client.images import to_pil
from camserve.client.render import COLORMAPS, overlay, panel
from camserve.client.requests import METHODS
from camserve.client.results import Explanation, ModelInfo
from camserve.client.retry import DEFAULT_RETRY, NO_RETRY
from camserve.client.sync import Client

ENV_SERVER = "CAMSERVE_SERVER"
OK, FAILED, USAGE = 0, 1, 2
CALL_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 3.0  # below the usual 5 s probe timeout, so the probe reports first


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit status."""
    parser = build_parser(default_server=os.environ.get(ENV_SERVER) or DEFAULT_ADDRESS)
    try:
        args = parser.parse_args(argv)
        if args.command == "explain" and args.target and args.top_k is not None:
            parser.error("--target and --top-k cannot be combined")
        client = _client(args)
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    except (OSError, ValueError) as exc:
        print(f"camserve: error: {exc}", file=sys.stderr)
        return USAGE
    with client:
        try:
            return int(args.run(client, args))
        except CamserveError as exc:
            print(f"camserve: {exc}", file=sys.stderr)
            return FAILED


def _common_options(default_server: str) -> argparse.ArgumentParser:
    """Connection options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=default_server,
        metavar="HOST:PORT",
        help=f"server address (env {ENV_SERVER}; default {DEFAULT_ADDRESS})",
    )
    common.add_argument("--timeout", type=_positive_float, help="seconds per call")
    common.add_argument("--token-file", type=Path, help="file holding the bearer token")
    common.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="use TLS, trusting this CA certificate"
    )
    return common


def build_parser(*, default_server: str = DEFAULT_ADDRESS) -> argparse.ArgumentParser:
    common = _common_options(default_server)
    parser = argparse.ArgumentParser(
        prog="camserve", description="Grad-CAM explanations from a camserve server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_explain(commands, common)
    models = commands.add_parser("models", parents=[common], help="list models and their layers")
    models.set_defaults(run=_models)
    health = commands.add_parser(
        "health",
        parents=[common],
        help="exit 0 when the server is SERVING, else 1",
        description="A container healthcheck: one line of output, exit 0 only when SERVING.",
    )
    health.set_defaults(run=_health)
    return parser


def _add_explain(commands: Any, common: argparse.ArgumentParser) -> None:
    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="explain images and write overlay PNGs",
        description="Writes <stem>_<method>_<class>.png overlays (original size) per image, "
        "or one <stem>_panel.png with --panel, and prints the top predictions. "
        "--timeout applies per image.",
    )
    explain.add_argument("images", nargs="+", type=Path, metavar="IMG")
    explain.add_argument("--model", help="model name (default: the server's default)")
    explain.add_argument(
        "--target",
        action="append",
        type=_class,
        default=[],
        help="class to explain, index or label; repeatable (default: the predicted class)",
    )
    explain.add_argument("--top-k", type=_positive_int, help="explain the k most probable classes")
    explain.add_argument(
        "--method",
        action="append",
        choices=list(METHODS),
        default=[],
        help="CAM method; repeatable (default: gradcam)",
    )
    explain.add_argument("--layer", help="target layer (default: the model's)")
    explain.add_argument("--panel", action="store_true", help="write image|heatmap|overlay panels")
    explain.add_argument("--out", type=Path, default=Path("out"), help="output folder (out)")
    explain.add_argument("--colormap", choices=COLORMAPS, default="jet")
    explain.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity (0.4)")
    explain.add_argument(
        "--predictions", type=_positive_int, default=3, help="predictions printed per image (3)"
    )
    explain.set_defaults(run=_explain)


def _client(args: argparse.Namespace) -> Client:
    """A client from the common options; a health check waits briefly and never retries."""
    token = args.token_file.read_text().strip() if args.token_file else None
    tls = TLSConfig(root_certificates=args.tls_ca) if args.tls_ca else None
    is_health = args.command == "health"
    return Client(
        address=args.server,
        tls=tls,
        token=token,
        timeout=args.timeout or (HEALTH_TIMEOUT_S if is_health else CALL_TIMEOUT_S),
        retry=NO_RETRY if is_health else DEFAULT_RETRY,
    )


def _explain(client: Client, args: argparse.Namespace) -> int:
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        print(f"camserve: error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = client.explain_many(
        args.images,
        timeout=(args.timeout or CALL_TIMEOUT_S) * len(args.images),  # --timeout is per image
        return_exceptions=True,
        model=args.model,
        target=args.target or None,
        top_k=args.top_k,
        methods=args.method or "gradcam",
        layer=args.layer,
        top_predictions=args.predictions,
    )
    status = OK
    for path, outcome in zip(args.images, outcomes, strict=True):
        if isinstance(outcome, CamserveError):
            print(f"{path.name}: {outcome}", file=sys.stderr)
            status = FAILED
            continue
        for prediction in outcome.predictions[: args.predictions]:
            print(
                f"{path.name}: {prediction.index} {prediction.label} {prediction.probability:.3f}"
            )
        _write_pictures(path, outcome, args)
    return status


def _write_pictures(path: Path, explanation: Explanation, args: argparse.Namespace) -> None:
    picture = to_pil(path)
    if args.panel:
        figure = panel(picture, explanation, colormap=args.colormap, alpha=args.alpha)
        figure.save(args.out / f"{path.stem}_panel.png")
        return
    for (method, class_index), heatmap in explanation.heatmaps.items():
        blended = overlay(picture, heatmap, colormap=args.colormap, alpha=args.alpha)
        blended.save(args.out / f"{path.stem}_{method}_{class_index}.png")


def _models(client: Client, args: argparse.Namespace) -> int:
    for info in client.models():
        print(_describe(info))
        for layer in info.layers:
            shape = "x".join(str(d) for d in layer.output_shape)
            print(f"  {layer.name}  {shape}")
    return OK


def _describe(info: ModelInfo) -> str:
    state = "ready" if info.ready else "not ready"
    return (
        f"{info.name} (version {info.version}, {info.device}, {state}): "
        f"input {info.input.height}x{info.input.width}, {info.num_classes} classes, "
        f"default layer {info.default_layer}, methods {','.join(info.methods)}, "
        f"max batch {info.max_batch_size}"
    )


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health_status()
    if status == SERVING:
        print(f"{args.server}: {status}")
        return OK
    print(f"{args.server}: {status}", file=sys.stderr)
    return FAILED


def _class(value: str) -> int | str:
    """A --target value: a class index when it is a number, else a label."""
    return int(value) if value.isdigit() else value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number
