"""The `camserve` command: explain images into PNG files, compare methods, list models, check
health.

Exit status: 0 success, 1 the server refused or failed, or the command could not read or write
a file (message on stderr), 2 usage error, 130 interrupted. A user's mistake (a bad path, an
unreadable image, a bad `--out`, an address where no server answers) is one line on stderr,
never a traceback.
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

from camserve.client import compare, outputs
from camserve.client.cli_inspect import add_inspect
from camserve.client.cli_kernels import add_kernels
from camserve.client.commandline import FAILED, INTERRUPTED, OK, USAGE, describe_os_error
from camserve.client.connection import DEFAULT_ADDRESS, TLSConfig
from camserve.client.errors import CamserveError, Unavailable
from camserve.client.health import SERVING
from camserve.client.images import to_pil
from camserve.client.render import COLORMAPS, overlay, panel
from camserve.client.requests import (
    BASELINES,
    METHODS,
    NORMALISATIONS,
    QUADRATURES,
    REDUCTIONS,
    SCORE_ALIASES,
)
from camserve.client.results import Explanation, ModelInfo
from camserve.client.retry import DEFAULT_RETRY, NO_RETRY
from camserve.client.sync import Client
from camserve.v1.methods import DEFAULT_METHOD
from camserve.v1.scores import CURVE_SCORES

ENV_SERVER = "CAMSERVE_SERVER"
CALL_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 3.0  # below the usual 5 s probe timeout, so the probe reports first


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit status."""
    parser = build_parser(default_server=os.environ.get(ENV_SERVER) or DEFAULT_ADDRESS)
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
        client = _client(args)
    except SystemExit as exc:  # argparse's way out: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    except (OSError, ValueError) as exc:
        print(f"camserve: error: {describe_os_error(exc)}", file=sys.stderr)
        return USAGE
    with client:
        try:
            return int(args.run(client, args))
        except CamserveError as exc:
            print(f"camserve: {exc}{_hint(exc, args.server)}", file=sys.stderr)
            return FAILED
        except OSError as exc:  # an image or an output file the command could not use
            print(f"camserve: error: {describe_os_error(exc)}", file=sys.stderr)
            return FAILED
        except KeyboardInterrupt:
            print("camserve: interrupted", file=sys.stderr)
            return INTERRUPTED


def _hint(exc: CamserveError, server: str) -> str:
    """What to check when nothing answered at the address."""
    if isinstance(exc, Unavailable):
        return f" (is a camserve server running at {server}? set --server or {ENV_SERVER})"
    return ""


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot check alone; a usage error (exit 2) names the options."""
    if args.command == "explain" and args.target and args.top_k is not None:
        parser.error("--target and --top-k cannot be combined")
    if args.command == "explain":
        outputs.check_folder(args.out)
    if args.command in ("features", "attention"):
        outputs.check_folder(args.out, f"{args.command} writes its figures")
    if args.command == "compare":
        args.out = outputs.panel_file(args.out)
    if args.command == "kernels":
        outputs.check_kernels_target(args.out)
    if args.command not in ("explain", "compare") or args.score_steps is None:
        return
    unset = list(SCORE_ALIASES.values()) if args.command == "compare" else []  # the defaults
    scores = _score_names(args.score) or unset
    if not any(name in CURVE_SCORES for name in scores):
        parser.error("--score-steps is for the curves: add --score deletion or --score insertion")


def _score_names(short: Sequence[str]) -> list[str]:
    """--score values (confidence, deletion, insertion) as score names, once each."""
    return list(dict.fromkeys(SCORE_ALIASES[name] for name in short))


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
    _add_compare(commands, common)
    add_kernels(commands, common)
    add_inspect(commands, common)
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
        help="CAM method or pixel attribution; repeatable (default: gradcam)",
    )
    explain.add_argument("--layer", help="target layer (default: the model's)")
    explain.add_argument(
        "--eigen-smooth", action="store_true", help="each map from its principal component"
    )
    explain.add_argument(
        "--aug-smooth", action="store_true", help="average six augmented copies (6x the cost)"
    )
    _add_score_options(explain, default_help="none")
    _add_pixel_options(explain)
    explain.add_argument("--panel", action="store_true", help="write image|heatmap|overlay panels")
    explain.add_argument(
        "--out", type=Path, default=Path("out"), metavar="DIR", help="output folder (out)"
    )
    explain.add_argument(
        "--colormap",
        choices=COLORMAPS,
        default="jet",
        help="heat colours (jet), or gray for grayscale pixel attributions",
    )
    explain.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity (0.4)")
    explain.add_argument(
        "--predictions", type=_positive_int, default=3, help="predictions printed per image (3)"
    )
    explain.set_defaults(run=_explain)


def _add_score_options(parser: argparse.ArgumentParser, *, default_help: str) -> None:
    parser.add_argument(
        "--score",
        action="append",
        choices=list(SCORE_ALIASES),
        default=[],
        help=f"faithfulness score of each heatmap; repeatable (default: {default_help})",
    )
    parser.add_argument(
        "--score-steps",
        type=_positive_int,
        metavar="N",
        help="steps of the deletion and insertion curves (default: the server's, 20)",
    )


def _add_pixel_options(parser: argparse.ArgumentParser) -> None:
    """Options of the pixel attributions (saliency ... guided_gradcam); unset: the server's."""
    group = parser.add_argument_group("pixel attributions")
    group.add_argument("--samples", type=_positive_int, help="smoothgrad's noisy copies (25)")
    group.add_argument(
        "--noise", type=_positive_float, help="smoothgrad's sigma over the input's range (0.15)"
    )
    group.add_argument("--seed", type=int, help="smoothgrad's noise seed (default: random)")
    group.add_argument("--steps", type=_positive_int, help="integrated_gradients' steps (50)")
    group.add_argument("--quadrature", choices=list(QUADRATURES), help="(gausslegendre)")
    group.add_argument("--baseline", choices=list(BASELINES), help="IG's baseline (zero)")
    group.add_argument(
        "--reduction", choices=list(REDUCTIONS), help="over colour channels (the method's own)"
    )
    group.add_argument(
        "--normalisation", choices=list(NORMALISATIONS), help="for display (min_max)"
    )


def _pixel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pixel attribution options given on the command line, as SDK keywords."""
    names = ("samples", "noise", "seed", "steps", "quadrature", "baseline")
    given = {name: getattr(args, name) for name in (*names, "reduction", "normalisation")}
    return {name: value for name, value in given.items() if value is not None}


def _add_compare(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "compare",
        parents=[common],
        help="compare methods on images: a score table and a panel PNG",
        description="Explains each image with each method, one request per method, and prints "
        "the mean of each score per method (and seconds per image), the best method per score, "
        "and a refused method's server message. Writes a panel: per image, the image and one "
        "overlay per method captioned with its scores. Exit 1 only when every method failed.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=list(METHODS),
        metavar="M1,M2,...",
        help=f"comma-separated methods (default: all of them: {','.join(METHODS)})",
    )
    _add_score_options(parser, default_help="all three")
    _add_pixel_options(parser)
    parser.add_argument("--model", help="model name (default: the server's default)")
    parser.add_argument("--layer", help="target layer (default: the model's)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(outputs.PANEL_NAME),
        metavar="FILE|DIR",
        help=f"the panel: a {', '.join(outputs.PANEL_SUFFIXES)} file, or a folder to write "
        f"{outputs.PANEL_NAME} into (default: {outputs.PANEL_NAME})",
    )
    parser.add_argument("--colormap", choices=COLORMAPS, default="jet")
    parser.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity (0.4)")
    parser.set_defaults(run=_compare)


def _client(args: argparse.Namespace) -> Client:
    """A client from the common options; a health check waits briefly and never retries."""
    token = args.token_file.read_text().strip() if args.token_file else None
    tls = TLSConfig(root_certificates=_pem_file(args.tls_ca)) if args.tls_ca else None
    is_health = args.command == "health"
    return Client(
        address=args.server,
        tls=tls,
        token=token,
        timeout=args.timeout or (HEALTH_TIMEOUT_S if is_health else CALL_TIMEOUT_S),
        retry=NO_RETRY if is_health else DEFAULT_RETRY,
    )


def _pem_file(path: Path) -> bytes:
    """The --tls-ca file's bytes, refused unless it holds a PEM certificate."""
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(
            f"--tls-ca {path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the "
            "CA certificate that signed the server's, in PEM form"
        )
    return data


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
        methods=args.method or DEFAULT_METHOD,
        layer=args.layer,
        top_predictions=args.predictions,
        eigen_smooth=args.eigen_smooth,
        aug_smooth=args.aug_smooth,
        scores=_score_names(args.score),
        score_steps=args.score_steps,
        **_pixel_kwargs(args),
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
        _print_scores(path, outcome)
        _write_pictures(path, outcome, args)
    return status


def _print_scores(path: Path, explanation: Explanation) -> None:
    """One line per scored heatmap: which map, then each score."""
    for (method, class_index), scores in explanation.scores.items():
        label = explanation.class_labels.get(class_index, "")
        values = " ".join(f"{name} {value:.4f}" for name, value in scores.items())
        print(f"{path.name}: {method} {class_index} {label}: {values}")


def _compare(client: Client, args: argparse.Namespace) -> int:
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        print(f"camserve: error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return USAGE
    try:
        pictures = [compare.load_picture(path) for path in args.images]
    except OSError as exc:
        print(f"camserve: error: cannot read image: {describe_os_error(exc)}", file=sys.stderr)
        return USAGE
    client.model(args.model or "")  # one call first: an absent server or model stops here
    scores = _score_names(args.score) or list(SCORE_ALIASES.values())
    options: dict[str, Any] = {"model": args.model, "layer": args.layer, "scores": scores}
    options.update(_pixel_kwargs(args))
    if args.score_steps is not None:
        options["score_steps"] = args.score_steps
    results = compare.run(client.explain, pictures, args.methods, **options)
    for line in compare.table(results, scores):
        print(line)
    figure = compare.panel(pictures, results, scores, colormap=args.colormap, alpha=args.alpha)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"panel written to {args.out}")
    if all(result.refused for result in results):
        print("camserve: every method failed; see the table above", file=sys.stderr)
        return FAILED
    return OK


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
        if info.method_costs:
            costs = ", ".join(
                f"{c.method} {c.rows_per_image}/{c.forward_passes:.2f}" for c in info.method_costs
            )
            print(f"  cost per image at {info.default_layer} (rows/forward passes): {costs}")
        if info.conv_layers:
            first = info.conv_layers[0]
            shape = "x".join(str(d) for d in first.weight_shape)
            count = len(info.conv_layers)
            print(f"  conv layers (camserve kernels): {count}, first {first.name} {shape}")
        _print_gates(info)
    return OK


def _print_gates(info: ModelInfo) -> None:
    if not info.gates:
        print("  attention gates: none")
        return
    kinds = {kind: sum(g.kind == kind for g in info.gates) for kind in ("channel", "spatial")}
    print(f"  attention gates: {kinds['channel']} channel, {kinds['spatial']} spatial")
    for gate in info.gates:
        shape = "x".join(str(d) for d in gate.shape)
        print(f"    {gate.name}  {gate.kind} {shape} ({gate.module})")


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


def _method_list(value: str) -> list[str]:
    """A --methods value: comma-separated method names, each known, once each."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown methods {unknown}; use a comma-separated list of {','.join(METHODS)}"
            if unknown
            else "name at least one method"
        )
    return list(dict.fromkeys(names))


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number
