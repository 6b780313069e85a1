"""Pixel attributions at one batch: the cases `benchmarks/engine.py --saliency` prints.

Each case is a ratio measured in one process, its two sides alternated round by round (medians
of the per-round ratios, after a warm-up), so both see about the same load of a shared machine:

- saliency_over_floor: camserve's saliency (explain pass, max |g| maps, one transfer) over the
  floor: a plain forward and `torch.autograd.grad` of the chosen logits to the input, with
  frozen parameters, on the engine's own model and memory format. Target <= 1.05.
- saliency_speedup_vs_captum: Captum's batched `Saliency(abs=True)` on the model as a user holds
  it, over camserve's saliency. Target >= 1.0.
- guided_gradcam_speedup_vs_captum: Captum's `GuidedGradCam` (bilinear, as the paper), two
  forward and two backward passes, over camserve's one forward. Target >= 1.8.
- smoothgrad25_over_25_saliency: camserve's SmoothGrad with n = 25 (rows after the pass, in
  passes of `batch` rows, noise drawn and gradients summed), over 25 saliency batches run one
  after another. Target <= 1.05.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from timing import timed as _timed
from torch import nn

from camserve.server.engine import CamEngine, RowRequest
from camserve.server.engine.gradient_rows import SaliencyParams, explain_with_gradient_rows

CASES = (
    "saliency_over_floor",
    "saliency_speedup_vs_captum",
    "guided_gradcam_speedup_vs_captum",
    "smoothgrad25_over_25_saliency",
)
TARGETS = {  # (bound, whether the ratio must be at most it)
    "saliency_over_floor": (1.05, True),
    "saliency_speedup_vs_captum": (1.0, False),
    "guided_gradcam_speedup_vs_captum": (1.8, False),
    "smoothgrad25_over_25_saliency": (1.05, True),
}
LAYER = "layer4"
SAMPLES = 25


def _paired(
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    repeats: int,
    device: torch.device,
    warm_up: bool = True,
) -> float:
    """The median over rounds of numerator time / denominator time (warmed up first unless the
    engine already is)."""
    if warm_up:
        numerator(), denominator()
    ratios = []
    for _ in range(repeats):
        top = _timed(numerator, device)
        bottom = _timed(denominator, device)
        ratios.append(top / bottom)
    return statistics.median(ratios)


def _model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval().to(device)


def run(name: str, batch: int, size: int, device: torch.device, repeats: int) -> list[Any]:
    """Every case's ratio at `batch` images of `size` x `size`."""
    from captum.attr import GuidedGradCam, Saliency

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
    user_model = _model(name, device)  # as a user holds it: trainable, contiguous
    engine = CamEngine(copy.deepcopy(user_model), device=device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.arange(batch, device=device) % 10
    classes = [(int(t),) for t in targets]
    saliency = [RowRequest(LAYER, ("saliency",), classes=c) for c in classes]
    guided = [RowRequest(LAYER, ("guided_gradcam",), classes=c) for c in classes]
    layout = torch.channels_last if engine.channels_last else torch.contiguous_format

    def floor() -> object:
        leaf = x.contiguous(memory_format=layout).requires_grad_()
        logits = engine.model(leaf)
        return torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), leaf)[0].cpu()

    def ours() -> object:
        return engine.explain_batch(x, saliency)

    captum_saliency = Saliency(user_model)
    captum_guided = GuidedGradCam(user_model, user_model.get_submodule(LAYER))
    params = SaliencyParams(samples=SAMPLES, seed=0)
    smooth = [RowRequest(LAYER, ("smoothgrad",), classes=c) for c in classes]
    ratios = {
        "saliency_over_floor": _paired(ours, floor, repeats, device),
        "saliency_speedup_vs_captum": _paired(
            lambda: captum_saliency.attribute(x, target=targets, abs=True).cpu(),
            ours,
            repeats,
            device,
        ),
        "guided_gradcam_speedup_vs_captum": _paired(
            lambda: captum_guided.attribute(x, target=targets, interpolate_mode="bilinear").cpu(),
            lambda: engine.explain_batch(x, guided),
            repeats,
            device,
        ),
        # Both sides run 25 passes of `batch` rows, so a round's two halves last as long and
        # see about the same load; the engine is warm by now.
        "smoothgrad25_over_25_saliency": _paired(
            lambda: explain_with_gradient_rows(engine, x, smooth, params, chunk_rows=batch),
            lambda: [ours() for _ in range(SAMPLES)],
            max(1, repeats // 2),
            device,
            warm_up=False,
        ),
    }
    return [{"case": case, "batch": batch, "ratio": round(ratios[case], 4)} for case in CASES]


def table(device: str, model: str, size: int, rows: list[dict[str, Any]]) -> str:
    """The rows with their targets, for people."""
    header = f"{'case':<36}{'batch':>6}{'ratio':>9}  target"
    lines = [f"device: {device}; {model} at {size}x{size}", header, "-" * len(header)]
    for row in rows:
        bound, at_most = TARGETS[row["case"]]
        met = (row["ratio"] <= bound) if at_most else (row["ratio"] >= bound)
        sign = "<=" if at_most else ">="
        lines.append(
            f"{row['case']:<36}{row['batch']:>6}{row['ratio']:>9.3f}  {sign} {bound} "
            f"{'met' if met else 'MISSED'}"
        )
    return "\n".join(lines)
