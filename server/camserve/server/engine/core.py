"""`CamEngine`: Grad-CAM-family explanations for a whole batch from one forward and one backward.

How it stays close to the cost of a plain forward pass:

- The model's parameters are frozen, so autograd records nothing while the input travels through
  the layers before the earliest target layer: that part runs, and frees memory, like inference.
- A forward hook on each target layer swaps its output for a differentiable copy (see `hooks`),
  so the tape starts there.
- One `torch.autograd.grad` call, never `.backward()`, gives every row's gradient at once (rows
  are independent in eval mode); several classes per row use `is_grads_batched=True` with one-hot
  grad outputs, rows with fewer classes padded with zero vectors. Parameter `.grad` stays None.
- All requested methods come from the same activations and gradients (see `methods`).
- Layers that are not NCHW maps (NHWC maps, token sequences of vision transformers) are read
  through their `layouts.Layout`: the engine differentiates the raw output and views activations
  and gradients as (N, C, h, w) maps, prefix tokens dropped, before the methods see them.

One synchronisation per batch: on a GPU the host must not wait for the device in the middle of
a batch, or the device idles while the host queues the rest. The classes to explain are planned
on the host from the requests (`rows.plan_classes`) and uploaded before the forward pass without
waiting; top-k classes are picked on the device by one `torch.topk`, the one-hot grad outputs are
built there, and every method's maps stay there (`methods.start`) until one
`transfer.to_host` moves them with the logits and the class indices. Only then are the per-row
results assembled (and the eigen methods' SVDs run: see `eigen`). `predict` and `predict_tail`
also synchronise once. Range checks on classes need only the logits' shape.

Precision: "bfloat16" (CPU or CUDA) and "float16" (CUDA) cast the model's floating parameters and
buffers once, at construction, and the inputs on the way in; no autocast, which would cast the
weights again on every forward pass. Activations and gradients are upcast to float32 before the
CAM arithmetic, and logits come back as float32. float16 gradients are kept out of underflow by
scaling the grad outputs by a power of two (`GRAD_SCALES`), divided out again in float32.

Memory format: with `channels_last=None` (the default) the engine uses channels_last tensors on
the CPU, where oneDNN convolutions run measurably faster in that layout (README, Performance;
compare `benchmarks/engine.py --memory-format contiguous`), and in reduced precision; contiguous
tensors for CUDA float32. A model that fails on channels_last input but works on contiguous input
makes the engine switch to contiguous for good. Pass True or False to decide explicitly. On CUDA
the engine turns on `torch.backends.cudnn.benchmark` when it is built.

Ownership and threads: the engine owns the model it is given. It moves it to the device, puts it
in eval mode and freezes its parameters; `explain_batch` and `predict` refuse to run if it is
later put back in train mode or unfrozen. One engine serves one caller at a time (an internal lock
serialises concurrent calls); different engines on different models may run in parallel threads.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from camserve.server.engine import augment, transfer
from camserve.server.engine.costs import MethodCost, method_cost
from camserve.server.engine.hooks import Capture, capture_targets
from camserve.server.engine.layers import (
    Probe,
    probe,
    probe_failed,
    probe_input,
    unknown_layer,
    unusable_layer,
)
from camserve.server.engine.layouts import NCHW, Layout, LayoutHints, declared_hints
from camserve.server.engine.methods import PendingMaps, finish, start
from camserve.server.engine.registry import BY_NAME, NAMES
from camserve.server.engine.rows import (
    ClassPlan,
    check_activations,
    check_batch,
    check_classes,
    check_images,
    check_row,
    map_groups,
    pick_classes,
    plan_classes,
    row_images,
)
from camserve.server.engine.tail import Tail, Tails
from camserve.server.engine.tracing import MODEL_CALLS
from camserve.server.engine.types import (
    EngineError,
    LayerError,
    LayerSpec,
    Retained,
    RowRequest,
    RowResult,
)

T = TypeVar("T")

PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# The one-hot grad outputs' value per precision, divided out of the float32 gradients again (a
# power of two, so exactly). float16 gradients below 6e-5 lose precision and below 6e-8 vanish;
# those of a logit with respect to a late layer are typically 1e-6 to 1e-2, and 2**12 lifts them
# into float16's normal range while leaving room up to 16 before overflow. bfloat16 has float32's
# exponent range and needs no scale.
GRAD_SCALES: dict[str, float] = {"float32": 1.0, "bfloat16": 1.0, "float16": 2.0**12}


def _parse_device(device: torch.device | str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(
            f"device {device!r} is not a torch device; use 'cpu' or 'cuda:0'"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked for CUDA but none is available; use 'cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return parsed


def _check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    if (
        len(input_size) != 2
        or not all(isinstance(side, int) and not isinstance(side, bool) for side in input_size)
        or min(input_size) < 1
    ):
        raise EngineError(f"input_size must be (height, width) positive ints, got {input_size!r}")
    return (input_size[0], input_size[1])


class CamEngine:
    """Explains batches of images for one model on one device. See the module docstring.

    `layouts` overrides what the engine detects about the layers' layouts (see
    `camserve.server.engine.layouts`); what it leaves unset comes from the model itself.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        precision: str = "float32",
        channels_last: bool | None = None,
        layouts: LayoutHints | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EngineError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._hints = (layouts or LayoutHints()).over(declared_hints(model))
        modules = dict(model.named_modules())
        for name in self._hints.layers:
            if not name or name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise EngineError(
                    f"a layout is configured for layer {name!r}, which is not a module of this "
                    f"model{hint}"
                )
        self._device = _parse_device(device)
        if precision not in PRECISIONS:
            raise EngineError(f"precision {precision!r} is unknown; use one of {list(PRECISIONS)}")
        if precision == "float16" and self._device.type != "cuda":
            raise EngineError(
                "precision 'float16' needs a CUDA device (the CPU has few float16 kernels); use "
                "'bfloat16' or 'float32' on the CPU"
            )
        self._precision = precision
        self._dtype = PRECISIONS[precision]
        self._grad_scale = GRAD_SCALES[precision]
        if self._device.type == "cuda":
            # Input sizes repeat from batch to batch: let cuDNN pick its fastest algorithms.
            torch.backends.cudnn.benchmark = True
        if channels_last is None:
            # Measured faster on the CPU (benchmarks/engine.py) and what tensor cores prefer in
            # reduced precision; undone by itself for models that cannot take channels_last.
            channels_last = self._device.type == "cpu" or precision != "float32"
            self._format_fallback = True
        else:
            self._format_fallback = False
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.eval()
        model.requires_grad_(False)
        model.to(self._device)
        if self._dtype != torch.float32:
            model.to(self._dtype)  # floating parameters and buffers, once: no autocast per call
        self._model = model.to(memory_format=self._memory_format)
        self._lock = threading.Lock()
        self._probes: dict[tuple[int, int], Probe] = {}
        # torch's attention prefers sequence-first token outputs (see hooks._copy).
        self._sequence_first = any(
            isinstance(module, nn.MultiheadAttention) and module.batch_first
            for module in model.modules()
        )
        self._batched_grads = True  # cleared for good if a model cannot vmap its backward
        self._tails = Tails(self._model, to_device=self._to_layout)

    @property
    def model(self) -> nn.Module:
        """The model the engine owns (eval mode, frozen, on `device`); do not modify it."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def channels_last(self) -> bool:
        return self._memory_format == torch.channels_last

    # ----------------------------------------------------------------------------- model facts

    def layers(self, input_size: tuple[int, int]) -> list[LayerSpec]:
        """Every valid target layer at `input_size` (height, width), in forward order."""
        with self._lock, MODEL_CALLS.running():
            return self._probe(_check_input_size(input_size)).specs()

    def default_layer(self, input_size: tuple[int, int]) -> str:
        """The layer explained when a request names none (rule: `camserve.server.engine.layers`)."""
        with self._lock, MODEL_CALLS.running():
            return self._probe(_check_input_size(input_size)).default_layer()

    def num_classes(self, input_size: tuple[int, int]) -> int:
        """The length of the model's logits for an input of `input_size` (height, width).

        A method rather than a property because it takes a probe pass (cached per size).
        """
        with self._lock, MODEL_CALLS.running():
            found = self._probe(_check_input_size(input_size))
        shape = found.output_shape
        if shape is None or len(shape) != 2:
            raise EngineError(
                f"the model returns {shape if shape else 'a non-tensor'}, not (N, num_classes) "
                "logits; camserve explains classifiers"
            )
        return int(shape[1])

    # ------------------------------------------------------------------------------ inference

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), float32 on the CPU, from an inference-mode forward pass."""
        images = check_images(batch)
        with self._lock, MODEL_CALLS.running():
            self._check_state()

            def forward(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return self._model(x)

            logits = self._run(forward, images)
            self._check_logits(logits, int(images.shape[0]))
            (host,) = transfer.to_host([logits.float()])
            return host

    def explain_batch(self, batch: torch.Tensor, rows: Sequence[RowRequest]) -> list[RowResult]:
        """Predictions and maps for each image of `batch` (N, 3, H, W), one RowRequest per image.

        Rows may name different layers, methods, classes and options; the union of their layers
        is hooked and each row gets only the methods it asked for. Maps are float32 on the CPU,
        ReLU'd, not normalised, at feature resolution (at input resolution with aug_smooth, whose
        six copies per image join the same pass). Rows with keep_activations also get
        `RowResult.retained` for the gradient-free methods.
        """
        rows = list(rows)
        images = check_batch(batch, rows)
        for index, row in enumerate(rows):
            check_row(index, row)
        input_hw = (int(images.shape[2]), int(images.shape[3]))
        expansion = augment.expand(images, rows)
        with self._lock, MODEL_CALLS.running():
            self._check_state()
            with torch.inference_mode(False), torch.enable_grad():
                results = self._explain(expansion, input_hw)
        return augment.collapse(expansion, results, input_hw)

    def predict_tail(
        self,
        layer: str,
        activations: torch.Tensor,
        images: torch.Tensor,
        image_index: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (R, num_classes), float32 on the CPU, of the model run from `layer` onwards.

        `activations` (R, C, h, w) stand in for the layer's output; only the modules after the
        layer run (`camserve.server.engine.tail`), in inference mode. `images` (B, 3, H, W) are
        the inputs the rows' activations came from and row r's is `images[image_index[r]]`
        (default: B == R, one per row, or B == 1, shared): the input size selects the split, and
        a model that cannot be split runs its full forward on them with the layer's output
        replaced (logged once per engine). The model may overwrite `activations` in place.
        """
        rows = check_activations(activations)
        pictures = check_images(images)
        index = row_images(image_index, rows, int(pictures.shape[0]))
        input_hw = (int(pictures.shape[2]), int(pictures.shape[3]))
        with self._lock, MODEL_CALLS.running():
            self._check_state()
            tail = self._tail(layer, input_hw)
            if tuple(activations.shape[1:]) != tail.shape:
                raise EngineError(
                    f"activations have shape {tuple(activations.shape)} but layer {layer!r} "
                    f"outputs {tail.shape} at {input_hw[0]}x{input_hw[1]}; pass rows of that "
                    "layer's output for images of that size"
                )
            logits = self._tails.run(tail, activations.detach(), pictures, index)
            self._check_logits(logits, rows)
            (host,) = transfer.to_host([logits.float()])
            return host

    def tail_fraction(self, layer: str, input_size: tuple[int, int]) -> float:
        """The FLOPs after `layer` over those of a whole forward pass at `input_size`: what one
        ablated row costs in forward passes (1.0 when the model cannot be split)."""
        input_hw = _check_input_size(input_size)
        with self._lock, MODEL_CALLS.running():
            self._check_state()
            return self._tails.fraction(self._tail(layer, input_hw), input_hw)

    def method_costs(
        self, layer: str, input_size: tuple[int, int], *, aug_smooth: bool = False
    ) -> dict[str, MethodCost]:
        """Every method's cost per image at `layer` (`camserve.server.engine.costs`)."""
        input_hw = _check_input_size(input_size)
        with self._lock, MODEL_CALLS.running():
            channels = self._spec(layer, input_hw).shape[0]
        fraction = self.tail_fraction(layer, input_size)
        return {
            method: method_cost(
                method, channels=channels, tail_fraction=fraction, aug_smooth=aug_smooth
            )
            for method in NAMES
        }

    # -------------------------------------------------------------------------------- internals

    def _explain(self, expansion: augment.Expansion, input_hw: tuple[int, int]) -> list[RowResult]:
        """The batch's results with one synchronisation: everything stays on the device until
        one `transfer.to_host` of the logits, the chosen classes and every method's maps."""
        images, rows = expansion.images, expansion.rows
        batch_size = int(images.shape[0])
        layer_names = list(dict.fromkeys(row.layer for row in rows))
        modules = {name: self._module(name, input_hw) for name in layer_names}
        plan = plan_classes(rows, expansion.class_source)
        groups = map_groups(rows, layer_names)
        subsets = [i for i, group in enumerate(groups) if len(group.rows) != batch_size]
        uploaded = transfer.to_device(
            [*plan.tensors(), *(torch.tensor(groups[i].rows) for i in subsets)], self._device
        )
        plan = plan.with_tensors(uploaded[:4])
        picked = dict(zip(subsets, uploaded[4:], strict=True))
        kept_rows = [i for i, row in enumerate(rows) if row.keep_activations]

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Capture], list[torch.Tensor]]:
            # Inputs of rows that keep activations, copied before the model may change x.
            kept = [x[i].to(torch.float32, copy=True) for i in kept_rows]
            if x.is_inference():  # made under the caller's inference_mode: copy it for autograd
                x = x.clone()
            sequence_first = self._sequence_first
            with capture_targets(modules, batch_size, sequence_first=sequence_first) as captures:
                return self._model(x), captures, kept

        logits, captures, kept_inputs = self._run(forward, images)
        self._check_logits(logits, batch_size)
        for source in dict.fromkeys(expansion.class_source):
            check_classes(expansion.origin[source], rows[source], int(logits.shape[1]))
        activations = [self._activation(captures[name], input_hw) for name in layer_names]
        layouts = [
            self._layout(name, a, input_hw)
            for name, a in zip(layer_names, activations, strict=True)
        ]

        scores = logits.detach().float()
        classes = pick_classes(plan, scores)
        gradients: list[torch.Tensor | None] = [None] * len(layer_names)
        if any(BY_NAME[method].needs_gradients for row in rows for method in row.methods):
            one_hot = self._grad_outputs(logits, classes, plan)
            gradients = self._gradients(logits, activations, one_hot)
            for name, gradient in zip(layer_names, gradients, strict=True):
                if gradient is None:
                    raise LayerError(
                        f"layer {name!r} does not influence the model's logits, so it has no "
                        f"gradient to explain; {self._probe(input_hw).listing()}"
                    )

        pending: list[PendingMaps] = []
        with torch.no_grad():
            maps_in = [
                self._method_inputs(*inputs)
                for inputs in zip(layouts, activations, gradients, strict=True)
            ]
            for position, group in enumerate(groups):
                a, g = maps_in[layer_names.index(group.layer)]
                entry = BY_NAME[group.method]
                g = g if entry.needs_gradients else None
                if position in picked:
                    a = a[picked[position]]
                    g = None if g is None else g[:, picked[position]]
                assert entry.kernel is not None, "check_row admits only methods made by the pass"
                pending.append(start(entry.kernel, a, g, eigen_smooth=group.eigen_smooth))

        host_scores, host_classes, *host_maps = transfer.to_host(
            [scores, classes, *(p.tensor for p in pending)]
        )
        host_scores = host_scores.clone()  # not a view of the buffer: see `methods.finish`
        columns = host_classes.T.tolist()
        chosen = [tuple(columns[i][:count]) for i, count in enumerate(plan.counts)]
        maps: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in rows]
        for group, waiting, host in zip(groups, pending, host_maps, strict=True):
            cams = finish(waiting, host)  # (K or 1, n, h, w)
            for column, i in enumerate(group.rows):
                for k, class_index in enumerate(chosen[i]):
                    maps[i][(group.method, class_index)] = cams[min(k, cams.shape[0] - 1), column]

        probabilities = torch.softmax(host_scores, dim=1)
        retained = self._retained(rows, layer_names, layouts, activations, kept_inputs, host_scores)
        return [
            RowResult(
                logits=host_scores[i],
                probabilities=probabilities[i],
                classes=chosen[i],
                layer=row.layer,
                maps=maps[i],
                retained=retained[i],
            )
            for i, row in enumerate(rows)
        ]

    def _method_inputs(
        self, layout: Layout, activation: torch.Tensor, gradient: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A layer's activations (N, C, h, w) and gradients (K, N, C, h, w) as float32 maps,
        the gradients' loss scale divided out (exact: it is a power of two)."""
        a = layout.to_maps(activation.detach()).float()
        if gradient is None:
            return a, None
        g = layout.to_maps(gradient).float()
        if self._grad_scale != 1.0:
            g = g / self._grad_scale
        return a, g

    def _retained(
        self,
        rows: list[RowRequest],
        layer_names: list[str],
        layouts: list[Layout],
        activations: list[torch.Tensor],
        inputs: list[torch.Tensor],
        scores: torch.Tensor,
    ) -> list[tuple[Retained, ...]]:
        """For rows with keep_activations: their input (float32) and layer output as a (C, h, w)
        map, copied on the device. Only an NCHW layer's map is also what the tail takes."""
        kept: list[tuple[Retained, ...]] = [() for _ in rows]
        wanted = [i for i, row in enumerate(rows) if row.keep_activations]
        for position, i in enumerate(wanted):
            layer = layer_names.index(rows[i].layer)
            layout = layouts[layer]
            activation = layout.to_maps(activations[layer][i].detach()).clone()
            kept[i] = (
                Retained(
                    image=inputs[position],
                    activation=activation,
                    logits=scores[i],
                    layout=layout.kind,
                ),
            )
        return kept

    def _grad_outputs(
        self, logits: torch.Tensor, classes: torch.Tensor, plan: ClassPlan
    ) -> torch.Tensor:
        """One-hot grad outputs (K, N, num_classes) built on the device from the (K, N) class
        indices: `grad_scale` at each row's k-th class, zero vectors for padding positions."""
        depth = int(classes.shape[0])
        one_hot = torch.zeros((depth, *logits.shape), dtype=logits.dtype, device=logits.device)
        values = plan.valid.to(logits.dtype) * self._grad_scale
        return one_hot.scatter_(2, classes[..., None], values[..., None])

    def _gradients(
        self,
        logits: torch.Tensor,
        activations: list[torch.Tensor],
        one_hot: torch.Tensor,
    ) -> list[torch.Tensor | None]:
        """dY_c/dA for every layer as (K, N, *A's shape per image), from the (K, N,
        num_classes) grad outputs: K = the most classes any row asks for."""
        depth = int(one_hot.shape[0])
        if depth == 1:
            single = torch.autograd.grad(logits, activations, one_hot[0], allow_unused=True)
            return [None if g is None else g[None] for g in single]
        if self._batched_grads:
            try:
                return list(
                    torch.autograd.grad(
                        logits,
                        activations,
                        one_hot,
                        retain_graph=True,  # the per-class fallback below needs the graph
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                )
            except torch.cuda.OutOfMemoryError:  # an alias of torch.OutOfMemoryError
                raise
            except (RuntimeError, NotImplementedError):
                # Some ops (custom autograd Functions among them) cannot run under vmap: fall
                # back to one backward per class for this model from now on.
                self._batched_grads = False
        per_class = [
            torch.autograd.grad(
                logits, activations, one_hot[k], retain_graph=k < depth - 1, allow_unused=True
            )
            for k in range(depth)
        ]
        stacked: list[torch.Tensor | None] = []
        for layer in range(len(activations)):
            grads = [per_class[k][layer] for k in range(depth)]
            present = [g for g in grads if g is not None]
            stacked.append(torch.stack(present) if len(present) == depth else None)
        return stacked

    def _module(self, name: str, input_hw: tuple[int, int]) -> nn.Module:
        try:
            return self._model.get_submodule(name)
        except AttributeError:
            raise unknown_layer(name, self._probe(input_hw)) from None

    def _activation(self, capture: Capture, input_hw: tuple[int, int]) -> torch.Tensor:
        name = capture.name
        if capture.calls == 0:
            raise unusable_layer(name, "did not run during the forward pass", self._probe(input_hw))
        if capture.calls > 1:
            raise unusable_layer(
                name,
                f"runs {capture.calls} times per forward pass (the model reuses this module), "
                "so it has no single feature map to explain",
                self._probe(input_hw),
            )
        if capture.problem is not None or capture.activation is None:
            reason = capture.problem or "produced no feature map"
            raise unusable_layer(name, reason, self._probe(input_hw))
        return capture.activation

    def _layout(self, name: str, activation: torch.Tensor, input_hw: tuple[int, int]) -> Layout:
        """How to read layer `name`'s captured output as maps, as the probe found it.

        Refuses layers the probe shows give no maps (no patch grid, no gradient), and an output
        whose shape differs from the probe's at the same input size.
        """
        probed = self._probe(input_hw)
        layout = probed.target_layout(name)
        shape = tuple(activation.shape)
        if layout is None:
            if activation.dim() != 4:
                raise unusable_layer(
                    name,
                    f"outputs a tensor of shape {shape} that the probe pass at this input size "
                    "did not see",
                    probed,
                )
            return Layout(NCHW, shape[1], (shape[2], shape[3]))
        if shape[1:] != layout.item_shape:
            expected = ", ".join(map(str, layout.item_shape))
            raise unusable_layer(
                name,
                f"outputs a tensor of shape {shape}, but (N, {expected}) in the probe pass at the "
                "same input size (its shape depends on the data)",
                probed,
            )
        return layout

    def _probe(self, input_hw: tuple[int, int]) -> Probe:
        """The model's layers at `input_hw`, from a cached probe pass (forward and backward)."""
        found = self._probes.get(input_hw)
        if found is None:
            self._check_state()
            try:
                sample = probe_input(input_hw)
                found = self._run(lambda x: probe(self._model, x, self._hints), sample)
            except Exception as exc:
                raise probe_failed(input_hw, exc) from exc
            self._probes[input_hw] = found
        return found

    def _spec(self, layer: str, input_hw: tuple[int, int]) -> LayerSpec:
        """`layer` as a target at `input_hw`, or the LayerError that says why it is not one."""
        self._module(layer, input_hw)
        found = self._probe(input_hw)
        for spec in found.specs():
            if spec.name == layer:
                return spec
        raise unusable_layer(
            layer,
            "is not a target layer (it must run once per forward pass and output an "
            "(N, C, H, W) map)",
            found,
        )

    def _tail(self, layer: str, input_hw: tuple[int, int]) -> Tail:
        """`layer`'s tail at `input_hw` (`camserve.server.engine.tail.Tails`)."""
        found = self._tails.cached(layer, input_hw)
        if found is not None:
            return found
        return self._tails.build(layer, self._spec(layer, input_hw).shape, probe_input(input_hw))

    def _run(self, forward: Callable[[torch.Tensor], T], images: torch.Tensor) -> T:
        """`forward` on the images moved to the device and memory format.

        If channels_last was chosen by default and the model fails on it (some models call
        `.view` on feature maps) but works on contiguous tensors, the engine switches to
        contiguous tensors for good. A failure either way is the model's own and is raised.
        """
        try:
            return forward(self._to_device(images))
        except RuntimeError:
            if not self._format_fallback or self._memory_format != torch.channels_last:
                raise
        self._set_memory_format(torch.contiguous_format)
        try:
            result = forward(self._to_device(images))
        except Exception:
            self._set_memory_format(torch.channels_last)
            raise
        self._format_fallback = False
        return result

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        self._memory_format = memory_format
        self._model.to(memory_format=memory_format)

    def _check_state(self) -> None:
        if any(module.training for module in self._model.modules()):
            raise EngineError(
                "the engine's model was put back in train mode after the engine was built; the "
                "engine owns its model: call model.eval() again or build a new CamEngine"
            )
        if any(parameter.requires_grad for parameter in self._model.parameters()):
            raise EngineError(
                "the engine's model has parameters with requires_grad=True; the engine owns its "
                "model and keeps it frozen: call model.requires_grad_(False) or build a new "
                "CamEngine"
            )

    @staticmethod
    def _check_logits(logits: object, batch_size: int) -> None:
        if (
            not isinstance(logits, torch.Tensor)
            or logits.dim() != 2
            or logits.shape[0] != batch_size
        ):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise EngineError(
                f"the model must return logits of shape (N, num_classes), it returned {got}; "
                "camserve explains classifiers (wrap the model so forward returns logits)"
            )

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Model inputs on the device, in the engine's precision and memory format."""
        x = images.detach().to(self._device, dtype=self._dtype, non_blocking=True)
        return x.contiguous(memory_format=self._memory_format)

    def _to_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """A 4-D tensor on the device in the engine's memory format; floating tensors in the
        engine's precision, which the model's weights are in."""
        dtype = self._dtype if tensor.is_floating_point() else None
        x = tensor.detach().to(self._device, dtype=dtype, non_blocking=True)
        return x.contiguous(memory_format=self._memory_format)
