"""`camserve features` and `camserve attention`: pictures of what a model computes inside.

`features` writes one grid per image and layer: the selected channels of the layer's output as
grayscale tiles, each labelled with its channel number. `attention` writes, per image, a bar
chart of every channel gate's weights (one chart per gate, stacked) and each spatial gate laid
over the photo like a heatmap (min-max stretched for display). Both ask the server for nothing
else (`heatmaps=False`), so the model runs forward only, and only as deep as the deepest layer
or gate asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from camserve.client.commandline import FAILED, OK, USAGE
from camserve.client.errors import CamserveError
from camserve.client.figures import MARGIN, feature_grid, gate_bars
from camserve.client.render import overlay
from camserve.client.results import Explanation
from camserve.client.sync import Client
from camserve.v1.render import normalise

CALL_TIMEOUT_S = 30.0
SELECTIONS = ("first", "top_mean", "top_gradcam")
BARS_WIDTH = 768  # pixels for a chart's bars: wide gates get thinner bars


def add_inspect(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds the `features` and `attention` commands."""
    features = commands.add_parser(
        "features",
        parents=[common],
        help="draw layers' feature maps as grids with channel numbers",
        description="One PNG per image and layer: the layer's channels as grayscale tiles.",
    )
    features.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    features.add_argument("--model", default="", help="model name (default: the server's)")
    features.add_argument(
        "--layer", action="append", required=True, help="a layer GetModel lists; repeatable"
    )
    features.add_argument("--channels", type=int, default=16, help="channels per layer")
    features.add_argument(
        "--select", choices=SELECTIONS, default="first", help="which channels (default: first)"
    )
    features.add_argument("--out", type=Path, default=Path("features"), help="output folder")
    features.set_defaults(run=run_features)
    attention = commands.add_parser(
        "attention",
        parents=[common],
        help="draw a model's attention gates: channel weights and spatial maps",
        description=(
            "Per image: a bar chart of each channel gate's weights, and each spatial gate "
            "overlaid on the image. The model must have gates (camserve models lists them)."
        ),
    )
    attention.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    attention.add_argument("--model", default="", help="model name (default: the server's)")
    attention.add_argument("--gate", action="append", default=[], help="only this gate; repeatable")
    attention.add_argument("--out", type=Path, default=Path("attention"), help="output folder")
    attention.set_defaults(run=run_attention)


def _missing(images: list[Path]) -> bool:
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        print(f"camserve: error: no such image file: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def _safe(name: str) -> str:
    return name.replace("/", "_") or "model"


def run_features(client: Client, args: argparse.Namespace) -> int:
    """Asks for the layers' channels and writes OUT/IMAGE_LAYER.png per image and layer."""
    if _missing(args.images):
        return USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = client.explain_many(
        args.images,
        timeout=(args.timeout or CALL_TIMEOUT_S) * len(args.images),
        return_exceptions=True,
        model=args.model,
        heatmaps=False,
        feature_layers=args.layer,
        channels=args.channels,
        channel_selection=args.select,
    )
    status = OK
    for path, outcome in zip(args.images, outcomes, strict=True):
        if isinstance(outcome, CamserveError):
            print(f"{path.name}: {outcome}", file=sys.stderr)
            status = FAILED
            continue
        for layer, found in outcome.feature_maps.items():
            title = f"{path.name}: {layer} ({len(found.means)} channels, {args.select} shown)"
            target = args.out / f"{path.stem}_{_safe(layer)}.png"
            feature_grid(found.array, found.channels, title=title).save(target)
            print(f"{path.name}: {layer} channels {list(found.channels)} -> {target}")
    return status


def _stack(figures: list[PILImage.Image]) -> PILImage.Image:
    """Figures one above the other on white."""
    width = max(figure.width for figure in figures)
    height = sum(figure.height + MARGIN for figure in figures)
    sheet = PILImage.new("RGB", (width, height), "white")
    top = 0
    for figure in figures:
        sheet.paste(figure, (0, top))
        top += figure.height + MARGIN
    return sheet


def _write_attention(path: Path, outcome: Explanation, out: Path) -> list[Path]:
    written = []
    bars = [
        gate_bars(
            gate.values,
            title=f"{name} ({len(gate.values)} channels)",
            bar_width=max(1, BARS_WIDTH // len(gate.values)),
        )
        for name, gate in outcome.gates.items()
        if gate.kind == "channel"
    ]
    if bars:
        written.append(out / f"{path.stem}_channel_gates.png")
        _stack(bars).save(written[-1])
    for name, gate in outcome.gates.items():
        if gate.kind == "spatial":
            written.append(out / f"{path.stem}_{_safe(name)}.png")
            # Stretched to the colormap's range for display; the values are the gate's own.
            overlay(path, normalise(gate.values)).save(written[-1])
    return written


def run_attention(client: Client, args: argparse.Namespace) -> int:
    """Asks for the gates' values and writes the bar charts and overlays per image."""
    if _missing(args.images):
        return USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = client.explain_many(
        args.images,
        timeout=(args.timeout or CALL_TIMEOUT_S) * len(args.images),
        return_exceptions=True,
        model=args.model,
        heatmaps=False,
        gates=args.gate or True,
        gate_resolution="original",
    )
    status = OK
    for path, outcome in zip(args.images, outcomes, strict=True):
        if isinstance(outcome, CamserveError):
            print(f"{path.name}: {outcome}", file=sys.stderr)
            status = FAILED
            continue
        for written in _write_attention(path, outcome, args.out):
            print(f"{path.name}: {len(outcome.gates)} gates -> {written}")
    return status
