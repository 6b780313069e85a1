"""The explain pass: one forward and one backward for a whole batch, every method's maps from
it, and one transfer to the host.

- Parameters are frozen, so autograd records nothing before the earliest target layer; a forward
  hook on each target layer swaps its output for a differentiable copy (`hooks`), so the tape
  starts there.
- One `torch.autograd.grad` call gives every row's gradient at once (rows are independent in eval
  mode); several classes per row use `is_grads_batched=True` with one-hot grad outputs, rows with
  fewer classes padded with zero vectors. A model whose probe showed that vmap cannot batch its
  backward (`facts`) takes one backward per class; so does a batch whose batched backward fails.
- Which maps a row gets is what its methods' registry entries produce; layers that are not NCHW
  maps are read through their `layouts.Layout` as (N, C, h, w) maps before the methods see them.
- A row may ask for more than maps (`RowRequest.outputs`): each kind the pass can send back is
  declared in `OUTPUTS`, as the row's tensor on the device, and joins the same transfer; the
  `ATTRIBUTIONS` kind sends the row's unreduced pixel attributions. So do the layers'
  activations and gates' values of `RowRequest.inspection` (`inspection`); a batch that asks
  for nothing else runs forward only there.
- Pixel attributions (saliency, guided backprop, ...) differentiate the input too, in the same
  backward or, for guided rows, in a second one from the same forward (`input_pass`); their
  maps are made by `saliency` and reduced over colour channels by the row's reduction.

One synchronisation per batch: the classes to explain are planned on the host
(`rows.plan_classes`) and uploaded without waiting; top-k classes are picked on the device, the
one-hot grad outputs are built there, and every method's maps stay there (`methods.start`) until
one `transfer.to_host` moves them with the logits and the class indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from camserve.server.engine import augment, inspection, transfer
from camserve.server.engine.activations import Nonlinearities, classify, guiding
from camserve.server.engine.facts import ModelFacts, check_logits
from camserve.server.engine.hooks import Capture, capture_targets
from camserve.server.engine.input_pass import (
    InputNeeds,
    InputTape,
    input_needs,
    make_leaf,
    pixel_attributions,
    run_backward,
)
from camserve.server.engine.layouts import Layout
from camserve.server.engine.methods import PendingMaps, finish, start
from camserve.server.engine.placement import Placement
from camserve.server.engine.registry import BY_NAME, GUIDED_METHODS, UNGUIDED_PIXEL_METHODS
from camserve.server.engine.rows import (
    ClassPlan,
    MapGroup,
    check_classes,
    map_groups,
    pick_classes,
    plan_classes,
)
from camserve.server.engine.saliency import reduce_channels
from camserve.server.engine.types import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    EngineError,
    LayerError,
    Retained,
    RowRequest,
    RowResult,
    attribution_kind,
)

Maps = dict[tuple[str, int], torch.Tensor]


@dataclass
class _Staged:
    """A batch's plan, uploaded before the forward pass: classes, method groups, their rows."""

    rows: list[RowRequest]
    layers: list[str]
    groups: list[MapGroup]
    plan: ClassPlan
    picked: dict[int, torch.Tensor]  # group position -> the rows it takes, when not all


@dataclass
class _Layer:
    """One target layer's capture, read as maps: layout, activations and gradients."""

    layout: Layout
    activation: torch.Tensor  # as captured, in the layer's own layout
    maps: torch.Tensor  # (N, C, h, w) float32
    gradients: torch.Tensor | None  # (K, N, C, h, w) float32, loss scale divided out


def _activations(layer: _Layer, row: int) -> torch.Tensor:
    """The row's target-layer output as a (C, h, w) float32 map."""
    return layer.maps[row]


# The outputs a row can ask for besides its maps: kind -> its tensor on the device, from the
# row's target layer read as maps. A new kind (the gradient at the input) is one entry here.
OUTPUTS: dict[str, Callable[[_Layer, int], torch.Tensor]] = {ACTIVATIONS: _activations}


def check_outputs(rows: list[RowRequest]) -> None:
    """Refuses an output kind the pass does not make, or one asked for twice."""
    kinds = [*OUTPUTS, ATTRIBUTIONS]
    for index, row in enumerate(rows):
        asked = tuple(row.outputs)
        unknown = [kind for kind in asked if kind not in kinds]
        if unknown or len(set(asked)) != len(asked) or isinstance(row.outputs, str):
            raise EngineError(
                f"rows[{index}].outputs must list distinct output kinds from {kinds}, "
                f"got {row.outputs!r}"
            )


class ExplainPass:
    """Runs the explain pass for one engine; the engine holds its lock around `run`."""

    def __init__(self, model: nn.Module, placement: Placement, facts: ModelFacts) -> None:
        self._model = model
        self._placement = placement
        self._facts = facts
        self._nonlinearities: Nonlinearities | None = None

    def nonlinearities(self, input_hw: tuple[int, int]) -> Nonlinearities:
        """How the model writes its nonlinearities (`activations`), from one probe forward."""
        if self._nonlinearities is None:
            sample = torch.zeros(1, 3, *input_hw)
            self._nonlinearities = classify(
                self._model, lambda forward: self._placement.run(forward, sample)
            )
        return self._nonlinearities

    def run(self, expansion: augment.Expansion, input_hw: tuple[int, int]) -> list[RowResult]:
        """The batch's results; see the module docstring."""
        if inspection.is_forward_only(expansion.rows):
            model, placement, facts = self._model, self._placement, self._facts
            return inspection.forward_only(
                model, placement, facts, expansion.images, expansion.rows, input_hw
            )
        staged = self._stage(expansion)
        needs = input_needs(staged.rows)
        if needs.guided:
            self._check_guided(staged.rows, input_hw)
        logits, captures, kept, tape, observed = self._forward(
            expansion.images, staged, input_hw, needs
        )
        for source in dict.fromkeys(expansion.class_source):
            check_classes(expansion.origin[source], staged.rows[source], int(logits.shape[1]))
        scores = logits.detach().float()
        classes = pick_classes(staged.plan, scores)
        layers = self._read_layers(staged, logits, classes, captures, input_hw, tape, needs)
        with torch.no_grad():
            attributions: dict[int, torch.Tensor] = {}
            pending = [
                self._start(staged, i, layers, tape, attributions)
                for i in range(len(staged.groups))
            ]
            extras = self._extras(staged, layers, attributions, observed, input_hw)
        host_scores, host_classes, *host = transfer.to_host(
            [scores, classes, *(p.tensor for p in pending), *(t for _, _, t in extras)]
        )
        host_maps, host_extras = host[: len(pending)], host[len(pending) :]
        outputs = _outputs_by_row(len(staged.rows), extras, host_extras)
        host_scores = host_scores.clone()  # not a view of the buffer: see `methods.finish`
        columns = host_classes.T.tolist()
        chosen = [tuple(columns[i][:count]) for i, count in enumerate(staged.plan.counts)]
        maps = _collect(staged, pending, host_maps, chosen)
        retained = _retained(staged, layers, kept, host_scores)
        probabilities = torch.softmax(host_scores, dim=1)
        return [
            RowResult(
                logits=host_scores[i],
                probabilities=probabilities[i],
                classes=chosen[i],
                layer=row.layer,
                maps=maps[i],
                retained=retained[i],
                outputs=outputs[i],
            )
            for i, row in enumerate(staged.rows)
        ]

    def _extras(
        self,
        staged: _Staged,
        layers: dict[str, _Layer],
        attributions: dict[int, torch.Tensor],
        observed: inspection.Observed,
        input_hw: tuple[int, int],
    ) -> list[inspection.Extra]:
        """Every per-row tensor beyond the heat maps: layer outputs, pixel maps, inspections."""
        extras = [
            (i, kind, OUTPUTS[kind](layers[row.layer], i))
            for i, row in enumerate(staged.rows)
            for kind in row.outputs
            if kind in OUTPUTS
        ] + _attribution_outputs(staged, attributions)
        return extras + self._inspect(staged, layers, observed, input_hw)

    def _stage(self, expansion: augment.Expansion) -> _Staged:
        rows, batch_size = expansion.rows, int(expansion.images.shape[0])
        check_outputs(rows)
        layers = list(dict.fromkeys([*(r.layer for r in rows), *inspection.gradient_layers(rows)]))
        plan = plan_classes(rows, expansion.class_source)
        groups = map_groups(rows, layers)
        subsets = [i for i, group in enumerate(groups) if len(group.rows) != batch_size]
        uploaded = transfer.to_device(
            [*plan.tensors(), *(torch.tensor(groups[i].rows) for i in subsets)],
            self._placement.device,
        )
        picked = dict(zip(subsets, uploaded[4:], strict=True))
        return _Staged(rows, layers, groups, plan.with_tensors(uploaded[:4]), picked)

    def _check_guided(self, rows: list[RowRequest], input_hw: tuple[int, int]) -> None:
        """Refuses the guided methods on a model whose nonlinearities they do not control."""
        asked = next(m for row in rows for m in row.methods if m in GUIDED_METHODS)
        refusal = self.nonlinearities(input_hw).refusal(asked, UNGUIDED_PIXEL_METHODS)
        if refusal is not None:
            raise EngineError(refusal)

    def _forward(
        self, images: torch.Tensor, staged: _Staged, input_hw: tuple[int, int], needs: InputNeeds
    ) -> tuple[
        torch.Tensor, dict[str, Capture], list[torch.Tensor], InputTape, inspection.Observed
    ]:
        """Logits, each target layer's capture, the inputs of rows that keep activations, the
        input leaf with its guide when a row asks for an input gradient, and what the
        inspection hooks saw."""
        modules = {name: self._facts.module(name, input_hw) for name in staged.layers}
        kept_rows = [i for i, row in enumerate(staged.rows) if row.keep_activations]
        batch_size = int(images.shape[0])
        wanted = inspection.observed_modules(staged.rows, skip=staged.layers)

        def forward(x: torch.Tensor) -> tuple[Any, ...]:
            # Inputs of rows that keep activations, copied before the model may change x.
            kept = [x[i].to(torch.float32, copy=True) for i in kept_rows]
            if x.is_inference():  # made under the caller's inference_mode: copy it for autograd
                x = x.clone()
            tape = InputTape()
            if needs.any:
                tape.leaf, x = make_leaf(x)
            sequence_first = self._facts.sequence_first
            with (
                capture_targets(modules, batch_size, sequence_first=sequence_first) as captures,
                inspection.observe(self._model, wanted, batch_size) as observed,
            ):
                done = lambda: any(c.calls for c in captures.values())  # noqa: E731
                with guiding(needs.guided, done) as guide:
                    tape.guide = guide
                    return self._model(x), captures, kept, tape, observed

        logits, captures, kept, tape, observed = self._placement.run(forward, images)
        check_logits(logits, batch_size)
        tape.check_guide()
        return logits, captures, kept, tape, observed

    def _inspect(
        self,
        staged: _Staged,
        layers: dict[str, _Layer],
        observed: inspection.Observed,
        input_hw: tuple[int, int],
    ) -> list[inspection.Extra]:
        """The rows' inspection outputs on the device: target layers from the pass's capture
        (with their gradients), other layers and gates from the inspection hooks."""
        if not any(row.inspection for row in staged.rows):
            return []
        everyone = {i: i for i in range(len(staged.rows))}
        read = inspection.observed_layers(staged.rows, observed, self._facts, input_hw)
        for name, layer in layers.items():
            read.setdefault(name, inspection.LayerMaps(layer.maps, everyone, layer.gradients))
        extras = inspection.feature_outputs(staged.rows, read)
        return extras + inspection.gate_outputs(staged.rows, observed)

    def _read_layers(
        self,
        staged: _Staged,
        logits: torch.Tensor,
        classes: torch.Tensor,
        captures: dict[str, Capture],
        input_hw: tuple[int, int],
        tape: InputTape,
        needs: InputNeeds,
    ) -> dict[str, _Layer]:
        """Each target layer as maps, with gradients when a row's method needs them; the
        input's gradients go to `tape`."""
        activations = [self._facts.activation(captures[name], input_hw) for name in staged.layers]
        layouts = [
            self._facts.layout(name, a, input_hw)
            for name, a in zip(staged.layers, activations, strict=True)
        ]
        gradients: list[torch.Tensor | None] = [None] * len(staged.layers)
        layer_gradients = any(
            BY_NAME[m].needs_gradients for row in staged.rows for m in row.methods
        ) or any(
            row.inspection is not None and row.inspection.needs_gradients for row in staged.rows
        )
        if layer_gradients or needs.any:
            one_hot = self._grad_outputs(logits, classes, staged.plan)
            found = run_backward(
                self._gradients,
                logits,
                activations if layer_gradients else None,
                tape,
                needs,
                one_hot,
            )
            self._unscale(tape)
            gradients = found if found is not None else gradients
            checked = gradients if layer_gradients else []
            for name, gradient in zip(staged.layers, checked, strict=False):
                if gradient is None:
                    raise LayerError(
                        f"layer {name!r} does not influence the model's logits, so it has no "
                        f"gradient to explain; {self._facts.probe(input_hw).listing()}"
                    )
        with torch.no_grad():
            return {
                name: self._as_maps(layout, activation, gradient)
                for name, layout, activation, gradient in zip(
                    staged.layers, layouts, activations, gradients, strict=True
                )
            }

    def _as_maps(
        self, layout: Layout, activation: torch.Tensor, gradient: torch.Tensor | None
    ) -> _Layer:
        """A layer's activations (N, C, h, w) and gradients (K, N, C, h, w) as float32 maps,
        the gradients' loss scale divided out (exact: it is a power of two)."""
        maps = layout.to_maps(activation.detach()).float()
        if gradient is None:
            return _Layer(layout, activation, maps, None)
        g = layout.to_maps(gradient).float()
        scale = self._placement.grad_scale
        return _Layer(layout, activation, maps, g / scale if scale != 1.0 else g)

    def _unscale(self, tape: InputTape) -> None:
        """The input gradients as float32 with the loss scale divided out (a power of two)."""
        scale = self._placement.grad_scale
        for name in ("plain", "guided"):
            found = getattr(tape, name)
            if found is not None:
                found = found.float()
                setattr(tape, name, found / scale if scale != 1.0 else found)

    @staticmethod
    def _start(
        staged: _Staged,
        position: int,
        layers: dict[str, _Layer],
        tape: InputTape,
        attributions: dict[int, torch.Tensor],
    ) -> PendingMaps:
        """One method group's maps, started on the device; a pixel method's unreduced
        attributions (K, n, 3, H, W) go to `attributions[position]`."""
        group = staged.groups[position]
        entry = BY_NAME[group.method]
        layer = layers[group.layer]
        a, g = layer.maps, layer.gradients if entry.needs_gradients else None
        picked = staged.picked.get(position)
        if picked is not None:
            a = a[picked]
            g = None if g is None else g[:, picked]
        if entry.pixel is not None:
            found = pixel_attributions(entry.pixel, tape, a, g, picked)
            attributions[position] = found
            maps = reduce_channels(found, group.reduction or entry.pixel.reduction)
            return PendingMaps(
                maps,
                projected=False,
                depth=int(maps.shape[0]),
                hw=(int(maps.shape[-2]), int(maps.shape[-1])),
            )
        assert entry.kernel is not None, "check_row admits only methods made by the pass"
        return start(entry.kernel, a, g, eigen_smooth=group.eigen_smooth)

    def _grad_outputs(
        self, logits: torch.Tensor, classes: torch.Tensor, plan: ClassPlan
    ) -> torch.Tensor:
        """One-hot grad outputs (K, N, num_classes) built on the device from the (K, N) class
        indices: `grad_scale` at each row's k-th class, zero vectors for padding positions."""
        depth = int(classes.shape[0])
        one_hot = torch.zeros((depth, *logits.shape), dtype=logits.dtype, device=logits.device)
        values = plan.valid.to(logits.dtype) * self._placement.grad_scale
        return one_hot.scatter_(2, classes[..., None], values[..., None])

    def _gradients(
        self,
        logits: torch.Tensor,
        activations: list[torch.Tensor],
        one_hot: torch.Tensor,
        retain: bool = False,
    ) -> list[torch.Tensor | None]:
        """dY_c/dA for every layer as (K, N, *A's shape per image), from the (K, N,
        num_classes) grad outputs: K = the most classes any row asks for. `retain` keeps the
        graph for another backward."""
        depth = int(one_hot.shape[0])
        if depth == 1:
            single = torch.autograd.grad(
                logits, activations, one_hot[0], retain_graph=retain, allow_unused=True
            )
            return [None if g is None else g[None] for g in single]
        if self._facts.batched_grads:
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
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError):
                pass  # this batch only: one backward per class below
        return _per_class(logits, activations, one_hot, retain)


def _per_class(
    logits: torch.Tensor, activations: list[torch.Tensor], one_hot: torch.Tensor, retain: bool
) -> list[torch.Tensor | None]:
    depth = int(one_hot.shape[0])
    per_class = [
        torch.autograd.grad(
            logits,
            activations,
            one_hot[k],
            retain_graph=retain or k < depth - 1,
            allow_unused=True,
        )
        for k in range(depth)
    ]
    stacked: list[torch.Tensor | None] = []
    for layer in range(len(activations)):
        grads = [per_class[k][layer] for k in range(depth)]
        present = [g for g in grads if g is not None]
        stacked.append(torch.stack(present) if len(present) == depth else None)
    return stacked


def _collect(
    staged: _Staged,
    pending: list[PendingMaps],
    host_maps: list[torch.Tensor],
    chosen: list[tuple[int, ...]],
) -> list[Maps]:
    """Each row's maps, (method, class) -> (h, w), finished on the host."""
    maps: list[Maps] = [{} for _ in staged.rows]
    for group, waiting, host in zip(staged.groups, pending, host_maps, strict=True):
        cams = finish(waiting, host)  # (K or 1, n, h, w)
        for column, i in enumerate(group.rows):
            for k, class_index in enumerate(chosen[i]):
                maps[i][(group.method, class_index)] = cams[min(k, cams.shape[0] - 1), column]
    return maps


def _retained(
    staged: _Staged, layers: dict[str, _Layer], inputs: list[torch.Tensor], scores: torch.Tensor
) -> list[tuple[Retained, ...]]:
    """For rows with keep_activations: their input (float32) and layer output as a (C, h, w)
    map, copied on the device, with the layer's layout."""
    kept: list[tuple[Retained, ...]] = [() for _ in staged.rows]
    wanted = [i for i, row in enumerate(staged.rows) if row.keep_activations]
    for position, i in enumerate(wanted):
        layer = layers[staged.rows[i].layer]
        activation = layer.layout.to_maps(layer.activation[i].detach()).clone()
        kept[i] = (
            Retained(
                image=inputs[position],
                activation=activation,
                logits=scores[i],
                layout=layer.layout.kind,
            ),
        )
    return kept


def _outputs_by_row(
    count: int, extras: list[inspection.Extra], host: list[torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Each row's extra tensors by kind, from their host copies."""
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for (i, kind, _), tensor in zip(extras, host, strict=True):
        outputs[i][kind] = tensor.clone()  # own memory, not a view of the buffer
    return outputs


def _attribution_outputs(
    staged: _Staged, attributions: dict[int, torch.Tensor]
) -> list[tuple[int, str, torch.Tensor]]:
    """(row, kind, tensor) for rows asking for ATTRIBUTIONS: each pixel method's unreduced
    attributions (classes, 3, H, W) under `attribution_kind(method)`."""
    found = []
    for position, tensor in attributions.items():
        group = staged.groups[position]
        for column, i in enumerate(group.rows):
            if ATTRIBUTIONS in staged.rows[i].outputs:
                count = staged.plan.counts[i]
                found.append((i, attribution_kind(group.method), tensor[:count, column]))
    return found
