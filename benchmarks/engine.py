"""How much a Grad-CAM costs with camserve's engine, next to a forward pass and the usual ways.

For each (model, batch) case, in a fresh subprocess, it times by alternating contenders run by
run (A B C ... A B C ...) after a warm-up, and reports medians; ratios are medians of per-round
ratios, since the runs of one round see about the same machine load:

Models: torchvision resnet18/resnet50 explained at `layer4`, and the vision transformers vit_b_16
and swin_t at the engine's default layer (vit_b_16: the last block's first norm, a token layer;
swin_t: its final channels-first map). pytorch-grad-cam and the tutorial loop get the
reshape_transform that layer needs (prefix tokens dropped, grid restored; NHWC to NCHW).

- forward: a plain forward pass under `torch.inference_mode`, the floor;
- engine: `CamEngine.explain`, Grad-CAM only, and all five methods at once;
- reference: pytorch-grad-cam's `GradCAM` on the whole batch;
- loop: the per-image hook loop of the Grad-CAM tutorials (forward + backward per image).

Peak memory above the loaded model is measured for the forward pass and the engine: on the CPU
each probe runs in its own subprocess (glibc told to return large blocks to the system, so
resident-set growth is the tensors' footprint) and reads the kernel's resident high-water mark
after resetting it; on CUDA it is `torch.cuda.max_memory_allocated`.

    python benchmarks/engine.py                       # table, all default cases
    python benchmarks/engine.py --models resnet18 --batches 8 --repeats 3
    python benchmarks/engine.py --models vit_b_16,swin_t
    python benchmarks/engine.py --json                # {"device": ..., "results": [...]}

The forward pass uses the memory format the engine settles on (`--memory-format auto`, the
engine's default, is channels_last on the CPU and under CUDA autocast), so the ratio to it measures
the explanation's cost, not the layout's. pytorch-grad-cam and the tutorial loop run as their users
run them: contiguous and float32 (pytorch-grad-cam converts activations to numpy, which has no
bfloat16).

On CUDA the cases also cover bfloat16 and float16 (the engine casts its weights once; the
forward pass runs the same cast model) and each result carries a "precision" field; CPU results
hold exactly the fields listed in `FIELDS`.

`--throughput` reports images per second instead: `CamEngine.explain_batch` (Grad-CAM of the top
class) against plain inference with `CamEngine.predict` on the same engine, per precision
(float32, bfloat16 and float16 on CUDA; float32 on the CPU unless `--precisions` says
otherwise), resnet50 at batches 64 and 256 unless told otherwise, inputs already on the device,
results on the host (each call's single transfer included).

    python benchmarks/engine.py --throughput                  # table
    python benchmarks/engine.py --throughput --json           # {"device": ..., "throughput": [...]}

`--gradient-free` times AblationCAM and ScoreCAM instead, per image, against pytorch-grad-cam's
on the same images (resnet50 at `layer4` and `layer3` by default, each case in a fresh process,
contenders alternated): camserve runs `explain_all` (one explain pass, then the follow-up rows in
chunks; AblationCAM rows through the layers after the target only), pytorch-grad-cam its own
loops. Both use the same chunk size (`--chunk`, default 32: pytorch-grad-cam's AblationCAM
batch; its ScoreCAM is given the same). Every image explains its top class.

    python benchmarks/engine.py --gradient-free --images 2 --repeats 1
    python benchmarks/engine.py --gradient-free --json   # {"device": ..., "gradient_free": [...]}

`--scores` measures the faithfulness scores instead (`camserve.server.engine.scoring`), on
resnet18 at batches 8 and 32 unless told otherwise, Grad-CAM of the top class, rows run through
`CamEngine.predict` in chunks of the batch size:

- confidence_change: explain + score, over explain alone (one extra row per map: about 2x);
- deletion_auc+insertion_auc (`--steps`, default 20): (explain + score - explain) over plain
  forward passes of as many rows in the same chunks, i.e. what building the perturbed images and
  collecting the curves adds to the forward passes they need.

    python benchmarks/engine.py --scores --json       # {"device": ..., "scores": [...]}

`--inspection` measures feature maps in explain requests instead (`inspection_cases`): explain
plus 3 layers x 16 channels over explain alone, and a feature-map-only request over a plain
forward, resnet18 at batch 32 unless told otherwise.

    python benchmarks/engine.py --inspection --json   # {"inspection": [{"case", "batch", "ratio"}]}

`--saliency` measures the pixel attributions instead (`benchmarks/saliency_cases.py`: saliency
over its floor and against Captum, Guided Grad-CAM against Captum, SmoothGrad against 25
saliency passes), on resnet18 at batch 32 unless told otherwise (`--input` sets the side):

    python benchmarks/engine.py --saliency --json     # {"device": ..., "saliency": [...]}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
import torchvision
from inspection_cases import run_inspection, table
from timing import timed as _timed
from torch import nn

from camserve.server.engine import (
    DEFAULT_STEPS,
    PRECISIONS,
    CamEngine,
    LayerSpec,
    RowRequest,
    explain_all,
    plan_from_results,
    run_scores,
)

FIELDS = (
    "model",
    "batch",
    "forward_s",
    "engine_s",
    "engine_all_methods_s",
    "reference_s",
    "loop_s",
    "engine_over_forward",
    "speedup_vs_reference",
    "engine_peak_mb",
    "forward_peak_mb",
)
ALL_METHODS_RATIO = "_all_methods_over_forward"
# The five gradient-weighted methods the "all methods" figures and targets were set for; the eigen
# methods add an SVD per map on the CPU.
ALL_METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam")
CNN_LAYER = "layer4"  # ResNets; other models use the engine's default layer
INPUT = 224
DEFAULT_MODELS = "resnet18,resnet50,vit_b_16,swin_t"
CPU_BATCHES = (1, 8, 32)
CUDA_BATCHES = (1, 8, 32, 64, 256)
CUDA_PRECISIONS = ("float32", "bfloat16", "float16")
# Targets on the CPU for batches of 8 and more.
TARGETS = {
    "engine_over_forward": 1.10,
    "all_methods_over_forward": 1.15,
    "speedup_vs_reference_at_32": 2.5,
    "peak_ratio": 1.2,
}
_MIB = 1024 * 1024


def build_model(name: str) -> nn.Module:
    """A torchvision classifier with seeded random weights: nothing is downloaded.

    torchvision's ViT initialises its head to zeros, which leaves no gradient to explain; it gets
    seeded random weights like the rest.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if isinstance(model, torchvision.models.VisionTransformer):
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def target_layer(engine: CamEngine) -> LayerSpec:
    """The layer explained: `layer4` for ResNets, else the engine's default."""
    specs = {spec.name: spec for spec in engine.layers((INPUT, INPUT))}
    name = CNN_LAYER if CNN_LAYER in specs else engine.default_layer((INPUT, INPUT))
    return specs[name]


def reshape_transform(spec: LayerSpec) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's reshape_transform for the layer: NCHW maps from tokens or NHWC."""
    channels, height, width = spec.shape
    if spec.layout == "nchw":
        return None

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if spec.layout == "tokens":  # prefix tokens first, then the patch grid
            tensor = tensor[:, tensor.shape[1] - height * width :, :]
        return tensor.reshape(tensor.shape[0], height, width, channels).permute(0, 3, 1, 2)

    return transform


class TutorialGradCAM:
    """The Grad-CAM tutorials' loop: hooks, then forward and backward one image at a time."""

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.transform = transform or (lambda tensor: tensor)
        self.activation: torch.Tensor | None = None
        self.gradient: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._save)

    def _save(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.activation = self.transform(output.detach())

        def keep(grad: torch.Tensor) -> None:
            self.gradient = self.transform(grad.detach())

        output.register_hook(keep)

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for image in batch:
            self.model.zero_grad()
            logits = self.model(image[None])
            logits[0, logits[0].argmax()].backward()
            assert self.activation is not None
            assert self.gradient is not None
            weights = self.gradient.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * self.activation).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
            cam = cam - cam.min()
            maps.append((cam / cam.max().clamp(min=1e-7))[0, 0].cpu())
        return maps


# ------------------------------------------------------------------------------ one case


FORMATS: dict[str, bool | None] = {"auto": None, "channels_last": True, "contiguous": False}


def _contenders(
    name: str, batch: int, device: torch.device, precision: str, memory_format: str
) -> dict[str, Callable[[], object]]:
    from pytorch_grad_cam import GradCAM

    base = build_model(name)
    engine = CamEngine(
        copy.deepcopy(base),
        device=device,
        precision=precision,
        channels_last=FORMATS[memory_format],
    )
    layout = torch.channels_last if engine.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    x_engine = x.contiguous(memory_format=layout)
    # The floor runs what the engine runs: its weights cast to the precision, once.
    dtype = PRECISIONS[precision]
    plain = copy.deepcopy(base).to(device, dtype).to(memory_format=layout)
    x_plain = x_engine.to(dtype)

    def forward() -> object:
        with torch.inference_mode():
            return plain(x_plain)

    spec = target_layer(engine)
    one = [RowRequest(spec.name)] * batch
    every = [RowRequest(spec.name, ALL_METHODS)] * batch

    transform = reshape_transform(spec)
    reference_model = copy.deepcopy(base).to(device)
    reference = GradCAM(
        model=reference_model,
        target_layers=[reference_model.get_submodule(spec.name)],
        reshape_transform=transform,
    )
    loop_model = copy.deepcopy(base).to(device)
    loop = TutorialGradCAM(loop_model, loop_model.get_submodule(spec.name), transform)
    return {
        "forward": forward,
        "engine": lambda: engine.explain_batch(x_engine, one),
        "engine_all_methods": lambda: engine.explain_batch(x_engine, every),
        "reference": lambda: reference(input_tensor=x, targets=None),
        "loop": lambda: loop(x),
    }


def _cuda_peak_mb(fn: Callable[[], object]) -> float:
    fn()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / _MIB


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def memory_probe(name: str, batch: int, contender: str, memory_format: str) -> float:
    """Peak resident-set growth (MiB) of one run, after a warm-up run, on the CPU."""
    engine = CamEngine(build_model(name), channels_last=FORMATS[memory_format])
    layout = torch.channels_last if engine.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, INPUT, INPUT).contiguous(memory_format=layout)
    if contender == "forward":
        model = engine.model

        def run() -> object:
            with torch.inference_mode():
                return model(x)

    else:
        rows = [RowRequest(target_layer(engine).name)] * batch

        def run() -> object:
            return engine.explain_batch(x, rows)

    run()  # one-time allocations (thread pools, kernel caches) are not the contender's footprint
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def _cpu_peak_mb(name: str, batch: int, contender: str, memory_format: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--memory-probe", f"{name}:{batch}:{contender}"]
    command += ["--memory-format", memory_format]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def run_case(
    name: str, batch: int, device: torch.device, precision: str, repeats: int, memory_format: str
) -> dict[str, Any]:
    contenders = _contenders(name, batch, device, precision, memory_format)
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, fn in contenders.items():
            times[key].append(_timed(fn, device))
    median = {key: statistics.median(values) for key, values in times.items()}

    def paired(numerator: str, denominator: str) -> float:
        # One ratio per round: both runs of a round saw about the same machine load.
        pairs = zip(times[numerator], times[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)

    if device.type == "cuda":
        engine_mb = _cuda_peak_mb(contenders["engine"])
        forward_mb = _cuda_peak_mb(contenders["forward"])
    else:
        engine_mb = _cpu_peak_mb(name, batch, "engine", memory_format)
        forward_mb = _cpu_peak_mb(name, batch, "forward", memory_format)
    result: dict[str, Any] = {
        "model": name,
        "batch": batch,
        "forward_s": median["forward"],
        "engine_s": median["engine"],
        "engine_all_methods_s": median["engine_all_methods"],
        "reference_s": median["reference"],
        "loop_s": median["loop"],
        "engine_over_forward": paired("engine", "forward"),
        "speedup_vs_reference": paired("reference", "engine"),
        "engine_peak_mb": engine_mb,
        "forward_peak_mb": forward_mb,
    }
    if device.type == "cuda":
        result["precision"] = precision
    # For the table and the target check only; --json leaves it out.
    result[ALL_METHODS_RATIO] = paired("engine_all_methods", "forward")
    return result


# ------------------------------------------------------------------------ gradient-free

GRADIENT_FREE_FIELDS = (
    "model",
    "layer",
    "method",
    "images",
    "camserve_s",
    "reference_s",
    "speedup",
)
GRADIENT_FREE_LAYERS = ("layer4", "layer3")
GRADIENT_FREE_METHODS = ("ablationcam", "scorecam")
# Targets: AblationCAM at least 20x faster than pytorch-grad-cam's at layer4; ScoreCAM no slower.
GRADIENT_FREE_TARGETS = {("ablationcam", "layer4"): 20.0, ("scorecam", "layer4"): 1.0}
GRADIENT_FREE_TARGETS[("scorecam", "layer3")] = 1.0


def _gradient_free_contenders(
    name: str, layer: str, method: str, images: int, device: torch.device, size: int, chunk: int
) -> dict[str, Callable[[], object]]:
    from pytorch_grad_cam import AblationCAM, ScoreCAM

    base = build_model(name)
    engine = CamEngine(copy.deepcopy(base), device=device)
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    rows = [RowRequest(layer, (method,), top_k=1)] * images
    reference_model = copy.deepcopy(base).to(device)
    target = [reference_model.get_submodule(layer)]
    if method == "ablationcam":
        reference: Any = AblationCAM(model=reference_model, target_layers=target, batch_size=chunk)
    else:
        reference = ScoreCAM(model=reference_model, target_layers=target)
        reference.batch_size = chunk  # read by its chunk loop; 16 otherwise

    def warm_up() -> None:
        # One-time work (the probe, the fx split and its check, kernel caches) stays out of the
        # timings; each contender still does all of its own per-request work.
        engine.tail_fraction(layer, (size, size))
        engine.explain_batch(x[:1], [RowRequest(layer, ("gradcam",))])
        with torch.inference_mode():
            reference_model(x[:1])

    return {
        "warm_up": warm_up,
        "camserve": lambda: explain_all(engine, x, rows, chunk_rows=chunk),
        "reference": lambda: reference(input_tensor=x, targets=None),
    }


def run_gradient_free_case(
    name: str,
    layer: str,
    method: str,
    images: int,
    device: torch.device,
    size: int,
    chunk: int,
    repeats: int,
) -> dict[str, Any]:
    """Seconds per image for camserve and pytorch-grad-cam, medians of alternated runs."""
    contenders = _gradient_free_contenders(name, layer, method, images, device, size, chunk)
    contenders.pop("warm_up")()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - pytorch-grad-cam's bars
        for _ in range(repeats):
            for key, fn in contenders.items():
                times[key].append(_timed(fn, device) / images)
    pairs = zip(times["reference"], times["camserve"], strict=True)
    return {
        "model": name,
        "layer": layer,
        "method": method,
        "images": images,
        "camserve_s": statistics.median(times["camserve"]),
        "reference_s": statistics.median(times["reference"]),
        "speedup": statistics.median(a / b for a, b in pairs),
    }


def _spawn_gradient_free(
    name: str, layer: str, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--gradient-free-case", f"{name}:{layer}:{method}"]
    command += ["--device", args.device, "--images", str(args.images), "--input", str(args.input)]
    command += ["--chunk", str(args.chunk), "--repeats", str(args.repeats or 1)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"case {name} {layer} {method} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _gradient_free_table(device: str, size: int, results: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<10}{'layer':>8}{'method':>13}{'images':>8}{'camserve s/img':>16}"
        f"{'reference s/img':>17}{'speed-up':>10}"
    )
    lines = [f"device: {device}, input {size}x{size}", header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['model']:<10}{r['layer']:>8}{r['method']:>13}{r['images']:>8}"
            f"{r['camserve_s']:>16.3f}{r['reference_s']:>17.3f}{r['speedup']:>10.1f}"
        )
    lines.append("targets:")
    for (method, layer), bound in GRADIENT_FREE_TARGETS.items():
        found = [r for r in results if r["method"] == method and r["layer"] == layer]
        if found:
            worst = min(r["speedup"] for r in found)
            met = "met   " if worst >= bound else "MISSED"
            lines.append(f"  {met} {method} at {layer} >= {bound:g}x: {worst:.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------ faithfulness scores

SCORE_FIELDS = (
    "model",
    "batch",
    "score",
    "seconds",
    "explain_s",
    "equivalent_forwards_s",
    "ratio",
)
SCORE_MODELS = "resnet18"
SCORE_BATCHES = (8, 32)
# Score name in the results -> the engine's score names it runs.
SCORE_CASES = {
    "confidence_change": ("confidence_change",),
    "deletion_auc+insertion_auc": ("deletion_auc", "insertion_auc"),
}
SCORE_TARGETS = {"confidence_change": 2.2, "deletion_auc+insertion_auc": 1.1}
ROWS_FIELD = "_rows"  # for the table only; --json leaves it out


def run_scores_case(name: str, batch: int, device: torch.device, steps: int, repeats: int) -> Any:
    """Times explain alone, explain + each score, and plain forwards of as many rows.

    A round runs explain alone, then explain + confidence change, then one plain forward of the
    same rows, then explain + deletion and insertion with a plain forward of a stand-in chunk of
    the same size after every scored chunk: the load of a shared machine drifts over the tens of
    seconds the curves take, and interleaving chunk by chunk keeps each ratio's two sides under
    the same load.
    """
    engine = CamEngine(build_model(name), device=device)
    x = torch.randn(batch, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(1))
    rows = [RowRequest(CNN_LAYER)] * batch
    curve_scores = SCORE_CASES["deletion_auc+insertion_auc"]
    plan, _ = plan_from_results(x, engine.explain_batch(x, rows), curve_scores, steps=steps)
    sizes = {len(chunk) for chunk in plan.chunks(batch)} | {batch}
    stand_ins = {size: torch.randn(size, 3, INPUT, INPUT) for size in sizes}

    def explain() -> object:
        return engine.explain_batch(x, rows)

    def confidence() -> object:
        plan, _ = plan_from_results(x, engine.explain_batch(x, rows), ("confidence_change",))
        return run_scores(plan, engine.predict, max_rows=batch)

    def curves() -> tuple[float, float, float, int]:
        """Seconds of explain, of scoring (planning included) and of the stand-in forwards."""
        results: list[Any] = []
        explained = _timed(lambda: results.append(engine.explain_batch(x, rows)), device)
        plans: list[Any] = []
        scoring = _timed(
            lambda: plans.append(plan_from_results(x, results[0], curve_scores, steps=steps)[0]),
            device,
        )
        plan = plans[0]
        plain = 0.0
        for chunk in plan.chunks(batch):
            scoring += _timed(lambda c=chunk: plan.record(c, engine.predict(plan.build(c))), device)
            stand_in = stand_ins[len(chunk)]
            plain += _timed(lambda s=stand_in: engine.predict(s), device)
        scoring += _timed(plan.results, device)
        return explained, scoring, plain, plan.rows

    explain(), confidence(), curves()  # warm-up
    alone, with_change, change_plain, rounds = [], [], [], []
    for _ in range(repeats):
        alone.append(_timed(explain, device))
        with_change.append(_timed(confidence, device))
        change_plain.append(_timed(lambda: engine.predict(stand_ins[batch]), device))
        rounds.append(curves())
    median = statistics.median
    return [
        {
            "model": name,
            "batch": batch,
            "score": "confidence_change",
            "seconds": median(with_change),
            "explain_s": median(alone),
            "equivalent_forwards_s": median(change_plain),
            # One ratio per round: its runs saw about the same machine load.
            "ratio": median(a / b for a, b in zip(with_change, alone, strict=True)),
            ROWS_FIELD: batch,
        },
        {
            "model": name,
            "batch": batch,
            "score": "deletion_auc+insertion_auc",
            "seconds": median(e + s for e, s, _, _ in rounds),
            "explain_s": median(e for e, _, _, _ in rounds),
            "equivalent_forwards_s": median(p for _, _, p, _ in rounds),
            "ratio": median(s / p for _, s, p, _ in rounds),
            ROWS_FIELD: rounds[0][3],
        },
    ]


def _spawn_scores_case(name: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--scores-case", f"{name}:{batch}"]
    command += ["--device", args.device, "--repeats", str(args.repeats), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scores case {name} batch {batch} failed:\n{done.stderr}")
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def _scores_table(device: str, results: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<10}{'batch':>6}  {'score':<28}{'rows':>6}{'seconds':>10}{'explain s':>11}"
        f"{'forwards s':>12}{'ratio':>8}{'target':>8}"
    )
    lines = [f"device: {device}", header, "-" * len(header)]
    for r in results:
        bound = SCORE_TARGETS[r["score"]]
        met = "met" if r["ratio"] <= bound else "MISSED"
        lines.append(
            f"{r['model']:<10}{r['batch']:>6}  {r['score']:<28}{r[ROWS_FIELD]:>6}"
            f"{r['seconds']:>10.3f}{r['explain_s']:>11.3f}{r['equivalent_forwards_s']:>12.3f}"
            f"{r['ratio']:>8.3f}  <= {bound:<4} {met}"
        )
    lines.append(
        "ratio: confidence_change = seconds / explain s; deletion+insertion = "
        "(seconds - explain s) / forwards s (plain forwards of the same rows)"
    )
    return "\n".join(lines)


def _run_scores(args: argparse.Namespace, device: torch.device) -> None:
    batches = [int(b) for b in args.batches.split(",")] if args.batches else SCORE_BATCHES
    models = args.models if args.models_given else SCORE_MODELS
    results: list[dict[str, Any]] = []
    for name in models.split(","):
        for batch in batches:
            print(f"scoring {name} batch {batch} ...", file=sys.stderr, flush=True)
            results += _spawn_scores_case(name, batch, args)
    description = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)"
    )
    if args.json:
        public = [{k: r[k] for k in SCORE_FIELDS} for r in results]
        print(json.dumps({"device": description, "scores": public}))
    else:
        print(_scores_table(description, results))


# ------------------------------------------------------------------------------ throughput

THROUGHPUT_FIELDS = (
    "model",
    "batch",
    "precision",
    "explain_images_per_s",
    "predict_images_per_s",
    "explain_over_predict",
)
THROUGHPUT_MODELS = "resnet50"
THROUGHPUT_BATCHES = (64, 256)


def run_throughput_case(
    name: str, batch: int, device: torch.device, precision: str, repeats: int
) -> dict[str, Any]:
    """Images per second of `explain_batch` (Grad-CAM of the top class at the target layer) and
    of `predict` on the same engine, both from device-resident inputs to results on the host,
    runs alternated after a warm-up."""
    engine = CamEngine(build_model(name), device=device, precision=precision)
    x = torch.randn(batch, 3, INPUT, INPUT, generator=torch.Generator().manual_seed(3)).to(device)
    rows = [RowRequest(target_layer(engine).name)] * batch

    def explain() -> object:
        return engine.explain_batch(x, rows)

    def predict() -> object:
        return engine.predict(x)

    contenders: dict[str, Callable[[], object]] = {"explain": explain, "predict": predict}
    for fn in contenders.values():  # warm-up: the probe, cuDNN's algorithm search
        fn()
        fn()
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, fn in contenders.items():
            times[key].append(_timed(fn, device))
    pairs = zip(times["explain"], times["predict"], strict=True)
    return {
        "model": name,
        "batch": batch,
        "precision": precision,
        "explain_images_per_s": batch / statistics.median(times["explain"]),
        "predict_images_per_s": batch / statistics.median(times["predict"]),
        "explain_over_predict": statistics.median(a / b for a, b in pairs),
    }


def _throughput_table(device: str, results: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<10}{'batch':>6}{'prec':>10}{'explain img/s':>15}{'predict img/s':>15}"
        f"{'explain/predict':>17}"
    )
    lines = [f"device: {device}, input {INPUT}x{INPUT}", header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['model']:<10}{r['batch']:>6}{r['precision']:>10}"
            f"{r['explain_images_per_s']:>15.1f}{r['predict_images_per_s']:>15.1f}"
            f"{r['explain_over_predict']:>17.3f}"
        )
    lines.append("explain/predict: median per-round ratio of their times (1.0: explaining is free)")
    return "\n".join(lines)


def _run_throughput(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    batches = [int(b) for b in args.batches.split(",")] if args.batches else THROUGHPUT_BATCHES
    default = CUDA_PRECISIONS if cuda else ("float32",)
    precisions = args.precisions.split(",") if args.precisions else list(default)
    if not cuda and "float16" in precisions:
        raise SystemExit("--precisions float16 needs --device cuda")
    results: list[dict[str, Any]] = []
    for name in (args.models if args.models_given else THROUGHPUT_MODELS).split(","):
        for batch in batches:
            for precision in precisions:
                print(
                    f"throughput {name} batch {batch} {precision} ...", file=sys.stderr, flush=True
                )
                command = [sys.executable, __file__, "--throughput-case"]
                command += [f"{name}:{batch}:{precision}", "--device", args.device]
                command += ["--repeats", str(args.repeats)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(
                        f"throughput {name} {batch} {precision} failed:\n{done.stderr}"
                    )
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    description = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    if args.json:
        public = [{k: r[k] for k in THROUGHPUT_FIELDS} for r in results]
        print(json.dumps({"device": description, "throughput": public}))
    else:
        print(_throughput_table(description, results))


# ------------------------------------------------------------------------------- driver


def _spawn_case(name: str, batch: int, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--case",
        f"{name}:{batch}:{precision}",
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ]
    command += ["--memory-format", args.memory_format]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"case {name} batch {batch} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _table(device: str, results: list[dict[str, Any]]) -> str:
    header = (
        f"{'model':<10}{'batch':>6}{'prec':>10}{'forward s':>11}{'engine s':>10}{'all5 s':>9}"
        f"{'ref s':>9}{'loop s':>9}{'eng/fwd':>9}{'all/fwd':>9}{'vs ref':>8}{'vs loop':>9}"
        f"{'eng MB':>8}{'fwd MB':>8}"
    )
    lines = [f"device: {device}", header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['model']:<10}{r['batch']:>6}{r.get('precision', 'float32'):>10}"
            f"{r['forward_s']:>11.4f}{r['engine_s']:>10.4f}{r['engine_all_methods_s']:>9.4f}"
            f"{r['reference_s']:>9.4f}{r['loop_s']:>9.4f}{r['engine_over_forward']:>9.3f}"
            f"{r[ALL_METHODS_RATIO]:>9.3f}"
            f"{r['speedup_vs_reference']:>8.2f}{r['loop_s'] / r['engine_s']:>9.2f}"
            f"{r['engine_peak_mb']:>8.1f}{r['forward_peak_mb']:>8.1f}"
        )
    return "\n".join(lines)


def _target_report(results: list[dict[str, Any]]) -> str:
    """Each CPU target for batches >= 8: met or missed, with the worst case."""
    checked = [r for r in results if r["batch"] >= 8 and "precision" not in r]
    if not checked:
        return "targets: no CPU case with batch >= 8 was run"
    at_32 = [r for r in checked if r["batch"] == 32]
    rows = [
        (
            "engine / forward <= 1.10",
            max(r["engine_over_forward"] for r in checked),
            TARGETS["engine_over_forward"],
            True,
        ),
        (
            "all five methods / forward <= 1.15",
            max(r[ALL_METHODS_RATIO] for r in checked),
            TARGETS["all_methods_over_forward"],
            True,
        ),
        (
            "engine peak / forward peak <= 1.2",
            max(r["engine_peak_mb"] / max(r["forward_peak_mb"], 1e-9) for r in checked),
            TARGETS["peak_ratio"],
            True,
        ),
    ]
    if at_32:
        rows.append(
            (
                "speedup vs pytorch-grad-cam at batch 32 >= 2.5",
                min(r["speedup_vs_reference"] for r in at_32),
                TARGETS["speedup_vs_reference_at_32"],
                False,
            )
        )
    lines = ["targets (CPU, batch >= 8; worst case shown):"]
    for label, worst, bound, upper in rows:
        met = worst <= bound if upper else worst >= bound
        lines.append(f"  {'met   ' if met else 'MISSED'} {label}: {worst:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated; default {DEFAULT_MODELS} (--gradient-free: resnet50; --scores: "
        f"{SCORE_MODELS})",
    )
    parser.add_argument("--batches", default="", help="comma-separated; default per device")
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed runs per contender (default 5; 1 with --gradient-free)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--precisions",
        default="",
        help="default float32,bfloat16,float16 on CUDA; the main cases take float32 only on the "
        "CPU, --throughput also bfloat16",
    )
    parser.add_argument(
        "--memory-format",
        choices=list(FORMATS),
        default="auto",
        help="the engine's layout (auto: its default); the forward pass follows it",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--gradient-free", action="store_true", help="time AblationCAM and ScoreCAM instead"
    )
    parser.add_argument("--layers", default=",".join(GRADIENT_FREE_LAYERS), help="--gradient-free")
    parser.add_argument("--images", type=int, default=2, help="images per --gradient-free run")
    parser.add_argument("--input", type=int, default=INPUT, help="--gradient-free input side")
    parser.add_argument("--chunk", type=int, default=32, help="--gradient-free rows per chunk")
    parser.add_argument("--gradient-free-case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--scores", action="store_true", help="measure the faithfulness scores (see above)"
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="--scores: deletion/insertion steps"
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="images/s of explain vs predict per precision (see above)",
    )
    parser.add_argument(
        "--saliency", action="store_true", help="measure the pixel attributions (see above)"
    )
    parser.add_argument("--throughput-case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--inspection", action="store_true", help="what feature maps cost (see above)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--scores-case", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models_given = args.models is not None
    args.models = args.models or ""

    if args.memory_probe:
        name, batch, contender = args.memory_probe.split(":")
        print(memory_probe(name, int(batch), contender, args.memory_format))
        return
    device = torch.device(args.device)
    if args.gradient_free_case:
        name, layer, method = args.gradient_free_case.split(":")
        result = run_gradient_free_case(
            name, layer, method, args.images, device, args.input, args.chunk, args.repeats or 1
        )
        print(json.dumps(result))
        return
    if args.gradient_free:
        _gradient_free_main(args, device)
        return
    if args.saliency:
        _saliency_main(args, device)
        return
    args.repeats = args.repeats or 5
    args.models = args.models or DEFAULT_MODELS
    if args.case:
        name, batch, precision = args.case.split(":")
        print(
            json.dumps(
                run_case(name, int(batch), device, precision, args.repeats, args.memory_format)
            )
        )
        return
    if args.scores_case:
        name, batch = args.scores_case.split(":")
        print(json.dumps(run_scores_case(name, int(batch), device, args.steps, args.repeats)))
        return
    if args.throughput_case:
        name, batch, precision = args.throughput_case.split(":")
        print(json.dumps(run_throughput_case(name, int(batch), device, precision, args.repeats)))
        return

    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.scores:
        _run_scores(args, device)
        return
    if args.throughput:
        _run_throughput(args, device)
        return
    if args.inspection:
        _run_inspection(args)
        return
    cuda = device.type == "cuda"
    batches = (
        [int(b) for b in args.batches.split(",")]
        if args.batches
        else list(CUDA_BATCHES if cuda else CPU_BATCHES)
    )
    precisions = (
        args.precisions.split(",")
        if args.precisions
        else (list(CUDA_PRECISIONS) if cuda else ["float32"])
    )
    if not cuda and precisions != ["float32"]:
        parser.error("--precisions other than float32 need --device cuda")
    results = []
    for name in args.models.split(","):
        for batch in batches:
            for precision in precisions:
                print(f"running {name} batch {batch} {precision} ...", file=sys.stderr, flush=True)
                results.append(_spawn_case(name, batch, precision, args))
    description = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    if args.json:
        public = [{k: v for k, v in r.items() if k != ALL_METHODS_RATIO} for r in results]
        print(json.dumps({"device": description, "results": public}))
    else:
        print(_table(description, results))
        if not cuda:
            print(_target_report(results))


def _run_inspection(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [32]
    rows = []
    for name in (args.models if args.models_given else "resnet18").split(","):
        for batch in batches:
            print(f"inspection {name} batch {batch} ...", file=sys.stderr, flush=True)
            rows += run_inspection(name, batch, INPUT, args.repeats)
    print(json.dumps({"inspection": rows}) if args.json else table(rows))


def _saliency_main(args: argparse.Namespace, device: torch.device) -> None:
    import saliency_cases  # beside this script

    batches = [int(b) for b in args.batches.split(",")] if args.batches else [32]
    name = (args.models or "resnet18").split(",")[0]
    rows: list[dict[str, Any]] = []
    for batch in batches:
        print(f"pixel attributions: {name} batch {batch} ...", file=sys.stderr, flush=True)
        rows += saliency_cases.run(name, batch, args.input, device, args.repeats or 5)
    cuda = device.type == "cuda"
    description = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    if args.json:
        print(json.dumps({"device": description, "saliency": rows}))
    else:
        print(saliency_cases.table(description, name, args.input, rows))


def _gradient_free_main(args: argparse.Namespace, device: torch.device) -> None:
    if args.repeats < 0 or args.images < 1 or args.chunk < 1:
        raise SystemExit("--repeats, --images and --chunk must be positive")
    results = []
    for name in (args.models or "resnet50").split(","):
        for layer in args.layers.split(","):
            for method in GRADIENT_FREE_METHODS:
                print(f"running {name} {layer} {method} ...", file=sys.stderr, flush=True)
                results.append(_spawn_gradient_free(name, layer, method, args))
    cuda = device.type == "cuda"
    description = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    if args.json:
        public = [{k: r[k] for k in GRADIENT_FREE_FIELDS} for r in results]
        print(json.dumps({"device": description, "gradient_free": public}))
    else:
        print(_gradient_free_table(description, args.input, results))


if __name__ == "__main__":
    main()
