"""How a model writes its nonlinearities, and guided backprop through the ones camserve controls.

Guided backprop (Springenberg et al.) replaces each ReLU's backward g * 1[x > 0] with
g * 1[x > 0] * 1[g > 0]. camserve extends the rule to ReLU6, which is piecewise linear too:
g * 1[0 < x < 6] * 1[g > 0]. Both are the function's own backward applied to max(g, 0), so the
guided pass needs no replacement function: a hook on each ReLU or ReLU6 output clamps the
gradient that reaches it.

Both the classification at load and the guided pass watch torch function calls with a
`TorchFunctionMode`, not the modules: `nn.ReLU` (in-place or not) and `nn.ReLU6` call
`F.relu` / `F.hardtanh(0, 6)`, and so do functional ReLUs (`F.relu` in densenet's forward,
`x.relu()`), so every call is seen whatever wrote it, in models that do not trace with torch.fx
too, and the pass cannot disagree with the classification. Smooth or other nonlinearities
(SiLU, GELU, Hardswish, sigmoid gates, ...) have no guided rule; a model using any of them is
refused the guided methods, naming the activation and where it runs.

Nothing of the model is changed: the mode and the tensor hooks exist only during a guided pass
(the hooks live on that pass's autograd graph and go with it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

_RELU_CALLS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
)
_HARDTANH_CALLS: frozenset[Callable[..., Any]] = frozenset(
    {F.hardtanh, F.hardtanh_, F.relu6, torch._C._nn.hardtanh, torch._C._nn.hardtanh_}
)
# Nonlinearities with no guided rule, by the name a refusal shows.
_OTHER_CALLS: dict[Callable[..., Any], str] = {
    F.silu: "SiLU",
    F.gelu: "GELU",
    F.hardswish: "Hardswish",
    F.mish: "Mish",
    F.elu: "ELU",
    F.selu: "SELU",
    F.celu: "CELU",
    F.softplus: "Softplus",
    F.leaky_relu: "LeakyReLU",
    F.prelu: "PReLU",
    F.rrelu: "RReLU",
    F.hardsigmoid: "Hardsigmoid",
    F.logsigmoid: "LogSigmoid",
    F.glu: "GLU",
    F.softsign: "Softsign",
    F.tanhshrink: "Tanhshrink",
    torch.sigmoid: "Sigmoid",
    torch.Tensor.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
    torch.Tensor.tanh: "Tanh",
    F.tanh: "Tanh",
    F.sigmoid: "Sigmoid",
}
GUIDED_RULE = "ReLU or ReLU6"


def _hardtanh_bounds(args: tuple[Any, ...], kwargs: dict[str, Any], func: Any) -> tuple[Any, Any]:
    if func is F.relu6:
        return 0.0, 6.0
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return low, high


def kind_of(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """'ReLU', 'ReLU6', another nonlinearity's name, or None for a call that is none."""
    if func in _RELU_CALLS:
        return "ReLU"
    if func in _HARDTANH_CALLS:
        low, high = _hardtanh_bounds(args, kwargs, func)
        return "ReLU6" if (float(low), float(high)) == (0.0, 6.0) else "Hardtanh"
    return _OTHER_CALLS.get(func)


@dataclass(frozen=True)
class Nonlinearities:
    """What one probe forward pass ran: controlled calls, and the first place of each other
    kind (kind -> (where, how many calls))."""

    relu: int
    relu6: int
    others: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        """Whether every nonlinearity is one the guided rule controls (and there is one)."""
        return not self.others and self.relu + self.relu6 > 0

    def refusal(self, method: str, instead: Sequence[str]) -> str | None:
        """Why `method` (a guided one) does not apply to this model, or None when it does;
        the message suggests the methods `instead`."""
        if self.guided:
            return None
        if not self.others:
            return (
                f"{method} needs {GUIDED_RULE} nonlinearities; this model runs none, so guided "
                f"backprop would be the plain gradient: use {' or '.join(instead)}"
            )
        found = ", ".join(
            f"{kind} (at {where}, {count} call{'s' if count > 1 else ''})"
            for kind, (where, count) in self.others.items()
        )
        return (
            f"{method} needs {GUIDED_RULE} nonlinearities; this model uses {found}, which guided "
            f"backprop has no rule for, so its map would not mean what it says: use "
            f"{' or '.join(instead)}"
        )


class _Watch(TorchFunctionMode):
    """Calls `seen(kind, func, args, kwargs, output)` for every nonlinearity call."""

    def __init__(self, seen: Callable[[str, Any], None]) -> None:
        super().__init__()
        self._seen = seen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        kind = kind_of(func, args, kwargs)
        if kind is not None:
            self._seen(kind, output)
        return output


@contextmanager
def _module_path(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules running now, innermost last, kept up to date by hooks."""
    stack: list[str] = []
    handles: list[RemovableHandle] = []

    def enter(name: str) -> Callable[..., None]:
        return lambda module, inputs: stack.append(name)

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(enter(name)))
                handles.append(module.register_forward_hook(leave))
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def classify(
    model: nn.Module, run: Callable[[Callable[[torch.Tensor], Any]], Any]
) -> Nonlinearities:
    """The model's nonlinearities, from one forward pass `run(forward)` (no gradients)."""
    counts = {"ReLU": 0, "ReLU6": 0}
    others: dict[str, tuple[str, int]] = {}

    with _module_path(model) as path:

        def seen(kind: str, output: Any) -> None:
            if kind in counts:
                counts[kind] += 1
                return
            where = path[-1] if path else "the model's forward"
            first, count = others.get(kind, (where, 0))
            others[kind] = (first, count + 1)

        def forward(x: torch.Tensor) -> Any:
            with torch.no_grad(), _Watch(seen):
                return model(x)

        run(forward)
    return Nonlinearities(counts["ReLU"], counts["ReLU6"], others)


@dataclass
class Guide:
    """One guided pass's switch and what it saw.

    `on` is read when the backward reaches each hooked output, so one forward serves a plain
    backward (off) and a guided one (on). `after_targets` counts controlled calls that ran after a
    target layer's output was captured: when there are none, the gradients at the target layers
    are the same with the guide on, and one backward serves both.
    """

    on: bool = False
    after_targets: int = 0
    uncontrolled: list[str] = field(default_factory=list)

    def clamp(self, gradient: torch.Tensor) -> torch.Tensor | None:
        return gradient.clamp(min=0) if self.on else None


class _Guiding(TorchFunctionMode):
    def __init__(self, guide: Guide, targets_done: Callable[[], bool]) -> None:
        super().__init__()
        self._guide = guide
        self._targets_done = targets_done

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        kind = kind_of(func, args, kwargs)
        if kind in ("ReLU", "ReLU6"):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._guide.clamp)
                self._guide.after_targets += int(self._targets_done())
        elif kind is not None:
            self._guide.uncontrolled.append(kind)
        return output


@contextmanager
def guiding(enabled: bool, targets_done: Callable[[], bool]) -> Iterator[Guide]:
    """While open (the forward pass), hooks every ReLU and ReLU6 output for guided backprop;
    `targets_done()` says whether the target layers have already run. Disabled: a no-op."""
    guide = Guide()
    if not enabled:
        yield guide
        return
    with _Guiding(guide, targets_done):
        yield guide
