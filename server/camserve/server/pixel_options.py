"""Checks `ExplainRequest.pixel_attribution` (the pixel attributions' options) into a plain record.

Torch-free, like the rest of request validation: what the engine needs arrives as names
(`camserve.server.engine.saliency` spells the same ones). Every refusal names the field and
what is allowed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from camserve.server.errors import InvalidRequest
from camserve.server.records import ModelMeta
from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb

FIELD = "pixel_attribution"  # the request field these options come from
DEFAULT_SAMPLES = 25
DEFAULT_NOISE = 0.15
DEFAULT_STEPS = 50
REDUCTIONS: dict[int, str] = {
    pb.REDUCTION_UNSPECIFIED: "",
    pb.REDUCTION_MAX_ABS: "max_abs",
    pb.REDUCTION_SUM_ABS: "sum_abs",
    pb.REDUCTION_SUM: "sum",
}
NORMALISATIONS: dict[int, str] = {
    pb.NORMALISATION_UNSPECIFIED: "min_max",
    pb.NORMALISATION_MIN_MAX: "min_max",
    pb.NORMALISATION_PERCENTILE_99: "percentile_99",
}
QUADRATURES: dict[int, str] = {
    pb.QUADRATURE_UNSPECIFIED: "gausslegendre",
    pb.QUADRATURE_GAUSS_LEGENDRE: "gausslegendre",
    pb.QUADRATURE_RIEMANN_LEFT: "riemann_left",
    pb.QUADRATURE_RIEMANN_RIGHT: "riemann_right",
    pb.QUADRATURE_RIEMANN_MIDDLE: "riemann_middle",
    pb.QUADRATURE_RIEMANN_TRAPEZOID: "riemann_trapezoid",
}
BASELINES: dict[int, str] = {
    pb.BASELINE_UNSPECIFIED: "zero",
    pb.BASELINE_ZERO: "zero",
    pb.BASELINE_BLACK: "black",
}


class PixelOptionError(InvalidRequest):
    """A `pixel_attribution` field the server refuses; the message starts with its path."""


@dataclass(frozen=True)
class PixelOptions:
    """The checked options, by engine name; `seed` is drawn when the request left it unset."""

    samples: int = DEFAULT_SAMPLES
    noise: float = DEFAULT_NOISE
    seed: int = 0
    steps: int = DEFAULT_STEPS
    quadrature: str = "gausslegendre"
    baseline: str = "zero"
    reduction: str = ""  # empty: each method's own
    normalisation: str = "min_max"


def _enum(value: int, names: dict[int, str], field: str, enum: object) -> str:
    if value not in names:
        offered = ", ".join(f"{enum.Name(v)}={v}" for v in names)  # type: ignore[attr-defined]
        raise PixelOptionError(f"{FIELD}.{field}: unknown value {value}; use one of {offered}")
    return names[value]


def _count(value: int, default: int, field: str, lowest: int, limits: LimitsSettings) -> int:
    """A copy or step count: 0 is the default; each costs a row with its input gradient."""
    count = value or default
    highest = limits.max_saliency_rows
    if not lowest <= count <= highest:
        raise PixelOptionError(
            f"{FIELD}.{field}: {count} is outside {lowest}..{highest} (this server's "
            "limits.max_saliency_rows); each costs a forward and a backward row per image: use "
            f"fewer, or 0 for the default {default}"
        )
    return int(count)


def pixel_options(options: pb.SaliencyOptions, limits: LimitsSettings) -> PixelOptions:
    """The request's pixel attribution options, checked, or PixelOptionError naming the field."""
    quadrature = _enum(options.quadrature, QUADRATURES, "quadrature", pb.Quadrature)
    noise = float(options.noise) or DEFAULT_NOISE
    if not (math.isfinite(noise) and noise > 0):
        raise PixelOptionError(
            f"{FIELD}.noise: {options.noise:.6g} must be a positive fraction of the input's range "
            f"(0 for the default {DEFAULT_NOISE})"
        )
    return PixelOptions(
        samples=_count(options.samples, DEFAULT_SAMPLES, "samples", 1, limits),
        noise=noise,
        seed=int(options.seed) if options.HasField("seed") else secrets.randbits(63),
        steps=_count(
            options.steps, DEFAULT_STEPS, "steps", 1 if quadrature == "gausslegendre" else 2, limits
        ),
        quadrature=quadrature,
        baseline=_enum(options.baseline, BASELINES, "baseline", pb.Baseline),
        reduction=_enum(options.reduction, REDUCTIONS, "reduction", pb.Reduction),
        normalisation=_enum(
            options.normalisation, NORMALISATIONS, "normalisation", pb.Normalisation
        ),
    )


def check_pixel_methods(
    methods: tuple[str, ...], meta: ModelMeta, aug_smooth: bool
) -> tuple[str, ...]:
    """The request's pixel methods; refuses aug_smooth with them (SmoothGrad is their
    smoothing)."""
    pixel = tuple(m for m in methods if meta.method_info[m].pixel)
    if pixel and aug_smooth:
        noisy = [info.method for info in meta.methods if info.gradient_rows == "noise"]
        raise PixelOptionError(
            f"aug_smooth: averages layer maps over augmented copies and does not apply to "
            f"{', '.join(pixel)}; unset aug_smooth, or smooth pixel attributions with "
            f"{' or '.join(noisy) or 'noisy copies'}"
        )
    return pixel


def gradient_rows(methods: tuple[str, ...], meta: ModelMeta, options: PixelOptions) -> int:
    """Rows with their input gradient after the pass, per image: SmoothGrad's copies, IG's
    points and its baseline."""
    total = 0
    for name in methods:
        path = meta.method_info[name].gradient_rows
        if path == "noise":
            total += options.samples
        elif path == "path":
            total += options.steps + 1
    return total
