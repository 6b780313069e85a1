"""The tail of a model: the modules after a target layer, as a function of that layer's output.

AblationCAM changes only the target layer's output, so only what follows it has to run again.
`split_after` traces the model with torch.fx, keeping the target layer as one call, and copies
every node downstream of that call into a new graph whose single input is the layer's output:
`tail(activations) -> logits`. It refuses (TailUnavailable, with the reason) when fx cannot trace
the model (data-dependent control flow, unsupported Python), when the layer is not one call of
the traced graph, or when something after the layer also reads a value computed before it (a
skip connection around the layer): then the tail is not a function of the layer's output alone.

The fallback, `replaced_output`, is a forward hook that swaps the layer's output for given
activations during an ordinary full forward pass: always correct, as costly as a forward pass.

`Tails` keeps, per engine, each (layer, input size)'s split, checked once against the full model
on a probe input, or the fallback and its reason; the first fallback is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from camserve.server.engine.tracing import MODEL_CALLS
from camserve.server.engine.transfer import to_device

log = logging.getLogger("camserve.engine")


class TailUnavailable(Exception):
    """The model cannot be split after the layer; the message says why."""


class _LayerAsLeaf(fx.Tracer):
    """The default tracer, except that the target layer stays one `call_module` node."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self._layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self._layer or super().is_leaf_module(
            m, module_qualified_name
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _downstream_only(graph: fx.Graph, target: fx.Node, layer: str) -> set[fx.Node]:
    """The nodes that depend on `target`, once checked that the output is among them and that
    none also reads a value computed before the layer."""
    after: set[fx.Node] = {target}  # depends on the layer's output
    before: set[fx.Node] = set()  # depends on the input by a path that avoids the layer
    output: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            before.add(node)
            continue
        if node is target:
            continue
        inputs = node.all_input_nodes
        if any(i in after for i in inputs):
            after.add(node)
        if any(i in before for i in inputs):
            before.add(node)
        if node.op == "output":
            output = node
    if output is None or output not in after:
        raise TailUnavailable(f"the model's output does not depend on {layer!r}")
    mixed = [n.name for n in graph.nodes if n in after and n in before]
    if mixed:
        raise TailUnavailable(
            f"what follows {layer!r} also reads values computed before it (at {mixed[0]!r}: a "
            "skip connection around the layer), so it is not a function of the layer's output"
        )
    return after


def split_after(model: nn.Module, layer: str) -> fx.GraphModule:
    """The graph of everything after `layer`: activations (N, C, h, w) -> the model's output.

    The returned module shares its submodules and parameters with `model`.
    """
    try:
        with MODEL_CALLS.tracing():  # the trace patches every module's __call__ meanwhile
            graph = _LayerAsLeaf(layer).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the fallback"
        raise TailUnavailable(f"torch.fx cannot trace the model ({_first_line(exc)})") from exc
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise TailUnavailable(f"the traced graph calls {layer!r} {len(calls)} times, not once")
    target = calls[0]
    after = _downstream_only(graph, target, layer)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {target: tail.placeholder("activations")}

    def copy(node: fx.Node) -> fx.Node:
        # Nodes neither after the layer nor before it are constants (parameters, attributes).
        if node not in env:
            for source in node.all_input_nodes:
                copy(source)
            env[node] = tail.node_copy(node, lambda n: env[n])
        return env[node]

    for node in graph.nodes:
        if node in after:
            copy(node)
    tail.lint()
    return fx.GraphModule(model, tail, class_name="Tail")


@contextmanager
def replaced_output(module: nn.Module, activations: torch.Tensor) -> Iterator[None]:
    """During the block, `module`'s output is replaced by `activations`."""

    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> torch.Tensor:
        return activations

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list that receives a copy of `module`'s output on each call."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            seen.append(output.clone())  # later in-place ops must not change the record

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def count_flops(fn: Callable[[], object]) -> int:
    """The matmul and convolution FLOPs `fn` runs (torch's own counter).

    The counter installs module hooks for the whole process while it runs, so it counts alone,
    like a trace (`tracing.MODEL_CALLS`): another thread's model call would otherwise be counted
    here, or run with the counter's hooks.
    """
    with MODEL_CALLS.tracing(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def split_mismatch(
    model: nn.Module, module: nn.Module, split: fx.GraphModule, sample: torch.Tensor
) -> str | None:
    """Why `split` does not reproduce `model` on `sample` (module is the split layer), or None.

    Run under the caller's inference mode, so the check sees what serving sees.
    """
    with recorded_output(module) as seen:
        expected = model(sample)
    if len(seen) != 1 or not isinstance(expected, torch.Tensor):
        return "the layer's output could not be recorded exactly once"
    try:
        got = split(seen[0])
    except Exception as exc:  # noqa: BLE001 - a split that cannot run is not used
        return f"the split fails to run ({_first_line(exc)})"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return "the split returns something other than the model's output"
    scale = float(expected.float().abs().max()) + 1e-6
    if not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3 * scale):
        return "the split's logits differ from the model's"
    return None


def flop_fraction(
    model: nn.Module, module: nn.Module, split: fx.GraphModule, sample: torch.Tensor
) -> float:
    """The FLOPs of `split` over those of the whole model on `sample`, at most 1."""
    with recorded_output(module) as seen:
        whole = count_flops(lambda: model(sample))
    after = count_flops(lambda: split(seen[0]))
    return min(1.0, after / whole) if whole > 0 else 1.0


@dataclass
class Tail:
    """A layer's tail at one input size: the fx split, or why the fallback is used."""

    layer: str
    shape: tuple[int, int, int]  # (C, h, w) of the layer's output for one image
    module: fx.GraphModule | None
    reason: str | None
    fraction: float | None = None  # the tail's share of a forward pass's FLOPs, once measured


class Tails:
    """One engine's tails. Not thread-safe: the engine calls it under its lock, in the model's
    device, memory format and precision (its weights are already cast), which `to_device`
    applies to the tensors it is given."""

    def __init__(
        self,
        model: nn.Module,
        *,
        to_device: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._model = model
        self._to_device = to_device
        self._found: dict[tuple[str, tuple[int, int]], Tail] = {}
        self._logged = False

    def cached(self, layer: str, input_hw: tuple[int, int]) -> Tail | None:
        return self._found.get((layer, input_hw))

    def build(self, layer: str, shape: tuple[int, int, int], sample: torch.Tensor) -> Tail:
        """`layer`'s tail for inputs like `sample` (N, 3, H, W), whose output is `shape` per
        image: split, and checked on `sample`."""
        input_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        split: fx.GraphModule | None = None
        try:
            split = split_after(self._model, layer)
            with torch.inference_mode():
                reason = split_mismatch(
                    self._model, self._model.get_submodule(layer), split, self._to_device(sample)
                )
        except TailUnavailable as exc:
            reason = str(exc)
        if reason is not None:
            split = None
            if not self._logged:
                self._logged = True
                log.warning(
                    "the model cannot be split after layer %r (%s); rows evaluated from that "
                    "layer run the whole forward pass instead",
                    layer,
                    reason,
                )
        found = Tail(layer, shape, split, reason)
        self._found[(layer, input_hw)] = found
        return found

    def run(
        self, tail: Tail, activations: torch.Tensor, images: torch.Tensor, index: list[int]
    ) -> torch.Tensor:
        """The model's output for `activations` standing in for the layer's output; `images`
        and `index` (each row's image) feed the fallback's full forward pass."""
        with torch.inference_mode():
            x = self._to_device(activations)
            if tail.module is not None:
                return tail.module(x)
            (rows,) = to_device([torch.tensor(index)], x.device)  # no wait for the device
            inputs = self._to_device(images.float())[rows]
            with replaced_output(self._model.get_submodule(tail.layer), x):
                output: torch.Tensor = self._model(inputs)
                return output

    def fraction(self, tail: Tail, input_hw: tuple[int, int]) -> float:
        """The tail's share of a whole forward pass's FLOPs (1.0 for the fallback)."""
        if tail.fraction is None:
            if tail.module is None:
                tail.fraction = 1.0
            else:
                sample = self._to_device(torch.zeros(1, 3, *input_hw))
                with torch.inference_mode():
                    tail.fraction = flop_fraction(
                        self._model, self._model.get_submodule(tail.layer), tail.module, sample
                    )
        return tail.fraction
