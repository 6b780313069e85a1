"""`camserve kernels`: a conv layer's weights as a grid PNG (and optionally a .npy file)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from camserve.client.commandline import OK
from camserve.client.kernels import Kernels
from camserve.client.sync import Client


def add_kernels(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "kernels",
        parents=[common],
        help="draw a conv layer's kernels as a grid PNG",
        description=(
            "Draws a Conv2d layer's weights: the first RGB conv as colour filters, deeper convs "
            "as one grayscale tile per (filter, input channel), each filter min-max normalised, "
            "in pages of at most --tiles-per-page tiles."
        ),
    )
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument(
        "--layer", default="", help="a Conv2d's name (default: the model's first conv layer)"
    )
    parser.add_argument("--page", type=int, default=0, help="page of the grid, from 0")
    parser.add_argument("--tiles-per-page", type=int, default=0, help="0: the server's limit")
    parser.add_argument("--tile-size", type=int, default=0, help="pixels per tile (0: 32)")
    parser.add_argument(
        "--out", type=Path, default=Path("kernels.png"), help="a .png file or a directory"
    )
    parser.add_argument("--npy", type=Path, help="also write the float32 weights to this .npy")
    parser.set_defaults(run=run_kernels)


def output_path(out: Path, kernels: Kernels) -> Path:
    """The PNG to write: `out` itself, or a file named after the layer and page inside it."""
    if out.is_dir():
        return out / f"kernels_{kernels.model}_{kernels.layer}_p{kernels.page}.png"
    return out


def run_kernels(client: Client, args: argparse.Namespace) -> int:
    """Asks for the page and writes it (`--out` was checked by `outputs.check_kernels_target`)."""
    kernels = client.kernels(
        args.layer,
        model=args.model,
        weights=args.npy is not None,
        page=args.page,
        tiles_per_page=args.tiles_per_page,
        tile_size=args.tile_size,
    )
    path = output_path(args.out, kernels)
    kernels.save(path)
    if args.npy is not None and kernels.weights is not None:
        np.save(args.npy, kernels.weights)
    kind = "colour filters" if kernels.colour else "grayscale (filter, channel) tiles"
    print(
        f"{kernels.model} {kernels.layer}: page {kernels.page + 1} of {kernels.pages}, filters "
        f"{kernels.first_filter}..{kernels.end_filter - 1}, {kernels.tiles} {kind} in "
        f"{kernels.rows}x{kernels.columns}; written {path}"
    )
    return OK
