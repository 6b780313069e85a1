"""Looking inside the model during the explain pass: layers' activations and gates' values.

Rows ask for them with an `Inspection`. Nothing runs twice for them:

- in an explain batch, a forward hook on each asked-for module copies its output for the rows
  that ask (`observe`), in the same forward; a layer that is also a target layer is read from the
  pass's own capture instead. Channels are chosen on the device (`row_outputs`), so only the
  selected planes, and every channel's mean and max, join the batch's one transfer to the host;
- a batch whose rows ask only for inspections (no methods, no channel ranking by gradient) runs
  forward only in inference mode (`forward_only`), and the last hook to fire stops the model
  there: the modules after the deepest asked-for one never run, so such rows have no logits.

Hooks copy what they see: a module's output may be changed in place by what follows it
(`ReLU(inplace=True)` after a BatchNorm), and the values shown must be the module's output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from camserve.server.engine import transfer
from camserve.server.engine.facts import ModelFacts
from camserve.server.engine.placement import Placement
from camserve.server.engine.types import (
    FIRST,
    INDICES,
    TOP_GRADCAM,
    TOP_MEAN,
    EngineError,
    FeatureAsk,
    RowRequest,
    RowResult,
    feature_keys,
    gate_key,
)

Extra = tuple[int, str, torch.Tensor]  # row, `RowResult.outputs` key, tensor on the device


class _AllSeen(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the last observing hook of a forward-only pass: the rest need not run."""


@dataclass
class Observed:
    """What the observing hooks saw: each module's output for the rows that asked, copied."""

    rows: dict[str, list[int]]  # module name -> the batch rows that asked for it
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # (rows, *item shape)
    calls: dict[str, int] = field(default_factory=dict)

    def seen(self, name: str) -> torch.Tensor:
        """The module's copied output, or the EngineError saying why there is none."""
        calls = self.calls.get(name, 0)
        if calls != 1 or name not in self.tensors:
            why = "did not run" if calls == 0 else f"ran {calls} times"
            raise EngineError(
                f"module {name!r} {why} in the forward pass, or returned no tensor for the batch; "
                "ask for a layer or gate GetModel lists"
            )
        return self.tensors[name]


def gradient_layers(rows: Sequence[RowRequest]) -> list[str]:
    """Layers whose channels some row ranks by Grad-CAM weight: they need the layer's gradient,
    so the pass captures them as target layers."""
    return [
        ask.layer
        for row in rows
        if row.inspection is not None
        for ask in row.inspection.features
        if ask.selection == TOP_GRADCAM
    ]


def is_forward_only(rows: Sequence[RowRequest]) -> bool:
    """Whether a batch needs no backward: every row asks only for an inspection without
    gradients (no methods, no kept activations, no outputs of the target layer)."""
    return all(
        row.inspection is not None
        and not row.inspection.needs_gradients
        and not row.methods
        and not row.keep_activations
        and not row.outputs
        for row in rows
    )


def observed_modules(rows: Sequence[RowRequest], skip: Sequence[str] = ()) -> dict[str, list[int]]:
    """Module name -> the rows asking for its output; feature layers in `skip` (the pass's
    target layers, read from its own capture) are left out, gates never."""
    wanted: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.inspection is None:
            continue
        layers = [ask.layer for ask in row.inspection.features if ask.layer not in skip]
        for name in dict.fromkeys([*layers, *row.inspection.gates]):
            wanted.setdefault(name, []).append(i)
    return wanted


def _copy_rows(output: torch.Tensor, rows: list[int], batch: int) -> torch.Tensor:
    detached = output.detach()
    if len(rows) == batch:
        return detached.clone()
    return detached.index_select(0, torch.tensor(rows, device=detached.device))


def _hook(observed: Observed, name: str, batch: int, stop: bool) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        observed.calls[name] = observed.calls.get(name, 0) + 1
        if observed.calls[name] > 1 or not isinstance(output, torch.Tensor):
            observed.tensors.pop(name, None)
            return
        if output.dim() < 2 or output.shape[0] != batch:
            return
        observed.tensors[name] = _copy_rows(output, observed.rows[name], batch)
        if stop and observed.tensors.keys() >= observed.rows.keys():
            raise _AllSeen

    return hook


@contextmanager
def observe(
    model: nn.Module, wanted: Mapping[str, list[int]], batch: int, *, stop: bool = False
) -> Iterator[Observed]:
    """Hooks each wanted module for one forward pass; removed on exit, even if forward raises.

    With `stop`, the hook that completes the set raises `_AllSeen`, which `forward_only` catches.
    """
    observed = Observed(rows=dict(wanted))
    handles = []
    try:
        for name in wanted:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise EngineError(
                    f"the model has no module {name!r}; ask for a layer or gate GetModel lists"
                ) from None
            handles.append(module.register_forward_hook(_hook(observed, name, batch, stop)))
        yield observed
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class LayerMaps:
    """A layer read as maps for some rows: (n, C, h, w) float32, and gradients when captured."""

    maps: torch.Tensor
    position: Mapping[int, int]  # batch row -> index into `maps`
    gradients: torch.Tensor | None = None  # (K, N, C, h, w), indexed by batch row


def _channels(ask: FeatureAsk, maps: LayerMaps, row: int, means: torch.Tensor) -> torch.Tensor:
    """The indices of the channels `ask` selects for `row`, on the maps' device."""
    count = min(ask.count, int(maps.maps.shape[1]))
    device = maps.maps.device
    if ask.selection == FIRST:
        return torch.arange(count, device=device)
    if ask.selection == INDICES:
        return torch.tensor(ask.indices, dtype=torch.int64, device=device)
    if ask.selection == TOP_MEAN:
        return torch.topk(means, count).indices
    if ask.selection == TOP_GRADCAM:
        if maps.gradients is None:
            raise EngineError(f"layer {ask.layer!r} was not captured with its gradient")
        weights = maps.gradients[0, row].float().mean(dim=(1, 2))
        return torch.topk(weights, count).indices
    raise EngineError(f"unknown channel selection {ask.selection!r}")


def feature_outputs(rows: Sequence[RowRequest], layers: Mapping[str, LayerMaps]) -> list[Extra]:
    """Each asking row's selected planes (k, h, w), their indices, and every channel's mean and
    max, as tensors on the device."""
    extras: list[Extra] = []
    stats = {
        name: (maps.maps.mean(dim=(2, 3)), maps.maps.amax(dim=(2, 3)))
        for name, maps in layers.items()
    }
    for i, row in enumerate(rows):
        for ask in row.inspection.features if row.inspection is not None else ():
            maps, keys = layers[ask.layer], feature_keys(ask.layer)
            position = maps.position[i]
            means, maxes = stats[ask.layer][0][position], stats[ask.layer][1][position]
            chosen = _channels(ask, maps, i, means)
            planes = maps.maps[position].index_select(0, chosen).contiguous()
            extras += [
                (i, keys.maps, planes),
                (i, keys.channels, chosen),
                (i, keys.means, means),
                (i, keys.maxes, maxes),
            ]
    return extras


def _gates_of(row: RowRequest) -> tuple[str, ...]:
    return row.inspection.gates if row.inspection is not None else ()


def gate_outputs(rows: Sequence[RowRequest], observed: Observed) -> list[Extra]:
    """Each asking row's gate values: (C,) for a channel gate, (H, W) for a spatial one."""
    extras: list[Extra] = []
    for name, asking in observed.rows.items():
        gated = [i for i in asking if name in _gates_of(rows[i])]
        if not gated:
            continue
        values = observed.seen(name).float()
        if values.dim() != 4:
            raise EngineError(f"gate {name!r} output {tuple(values.shape)}, not (N, C, H, W)")
        flat = values.flatten(1) if values.shape[2] * values.shape[3] == 1 else values[:, 0]
        position = {row: p for p, row in enumerate(asking)}
        extras += [(i, gate_key(name), flat[position[i]]) for i in gated]
    return extras


def observed_layers(
    rows: Sequence[RowRequest], observed: Observed, facts: ModelFacts, input_hw: tuple[int, int]
) -> dict[str, LayerMaps]:
    """The observed feature layers as (n, C, h, w) maps through their layouts (tokens, NHWC)."""
    names = {ask.layer for row in rows if row.inspection for ask in row.inspection.features}
    found: dict[str, LayerMaps] = {}
    for name in names & observed.rows.keys():
        tensor = observed.seen(name)
        layout = facts.layout(name, tensor, input_hw)
        maps = layout.to_maps(tensor).float()
        found[name] = LayerMaps(maps, {row: p for p, row in enumerate(observed.rows[name])})
    return found


def forward_only(
    model: nn.Module,
    placement: Placement,
    facts: ModelFacts,
    images: torch.Tensor,
    rows: Sequence[RowRequest],
    input_hw: tuple[int, int],
) -> list[RowResult]:
    """A batch of inspection-only rows: one inference-mode forward, stopped once every asked-for
    module has run; results carry no logits (empty tensors), classes or maps."""
    wanted = observed_modules(rows)
    batch = int(images.shape[0])
    with (
        torch.inference_mode(),
        observe(model, wanted, batch, stop=True) as observed,
        suppress(_AllSeen),
    ):
        placement.run(model, images)
    extras = feature_outputs(rows, observed_layers(rows, observed, facts, input_hw))
    extras += gate_outputs(rows, observed)
    host = transfer.to_host([tensor for _, _, tensor in extras])
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in rows]
    for (i, key, _), tensor in zip(extras, host, strict=True):
        outputs[i][key] = tensor.clone()
    empty = torch.empty(0)
    return [
        RowResult(
            logits=empty, probabilities=empty, classes=(), layer=row.layer, maps={}, outputs=out
        )
        for row, out in zip(rows, outputs, strict=True)
    ]
