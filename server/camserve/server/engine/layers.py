"""Which modules can be explained, in which layout, and which one to use by default.

One probe forward pass at a given input size, with a hook on every submodule (the root
excluded), records each module call in completion order. The probe input requires gradients and
one backward pass from a random projection of the logits follows, which shows which layers the
logits depend on at all. From it:

- A module is a valid target layer when it runs exactly once per forward pass and outputs one
  map or token sequence per image: NCHW or NHWC maps, or (N, P + h * w, C) tokens whose patch
  grid `layouts` can find. Modules called several times (a shared activation such as torchvision
  BasicBlock's `relu`) have no single feature map; modules returning tuples or other objects have
  none either. GetModel lists every valid layer with its (C, h, w) map shape.
- A valid layer whose grid positions receive no gradient at all is refused when explained: every
  map would be empty. That is the case for the patch tokens of a ViT's last block, which only the
  class token leaves; the message names a layer to use instead.
- The default layer. When the last spatial output (h * w > 1) of the pass is an NCHW map (CNNs),
  it is the module behind it, provided that module runs once: containers finish after their
  children, so for torchvision's ResNet this is `layer4`; if that module runs several times (a
  head activation shared with the stem) there is no safe default and the engine asks for an
  explicit layer. When the last spatial output is NHWC or tokens (Swin, ViT), it is the last
  layer whose positions receive gradient, keeping the model's final width where possible and
  skipping `nn.Identity` placeholders: the last block's first norm for a class-token ViT
  (pytorch-grad-cam's recipe), the last block or final norm for a mean-pooled head.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from camserve.server.engine.hooks import OutputEvent, Recording, record_outputs
from camserve.server.engine.layouts import (
    NCHW,
    TOKENS,
    Detector,
    Layout,
    LayoutHints,
    Refused,
    tiles,
)
from camserve.server.engine.types import EngineError, LayerError, LayerSpec

PROBE_CHANNELS = 3
# Two images, not one: a model that squeezes its batch dimension would mislead a batch-1 probe.
PROBE_BATCH = 2
_LISTED = 20  # names shown in an error message before "... and N more"


@dataclass(frozen=True)
class Probe:
    """What one forward and backward pass at `input_hw` revealed about the model's modules."""

    input_hw: tuple[int, int]
    batch: int  # images in the probe's input
    events: tuple[OutputEvent, ...]
    calls: dict[str, int]
    output_shape: tuple[int, ...] | None  # the model's own output, None if not a tensor
    layouts: tuple[Layout | Refused | None, ...] = ()  # one per event
    silent: frozenset[str] = frozenset()  # valid layers whose positions get no gradient

    def _first(self, name: str) -> Layout | Refused | None:
        for event, layout in zip(self.events, self.layouts, strict=True):
            if event.name == name:
                return layout
        return None

    def specs(self) -> list[LayerSpec]:
        """Every valid target layer, in forward-completion order."""
        return [
            LayerSpec(event.name, layout.shape, layout.kind)
            for event, layout in zip(self.events, self.layouts, strict=True)
            if isinstance(layout, Layout) and self.calls[event.name] == 1
        ]

    def target_layout(self, name: str) -> Layout | None:
        """The layout in which `explain_batch` reads layer `name`.

        Raises LayerError for a layer the probe shows cannot give maps: a sequence without a
        patch grid, a layout override that does not fit, positions without gradient. None when
        the probe saw no single tensor output, so that the capture reports what it sees.
        """
        if self.calls.get(name, 0) != 1:
            return None
        found = self._first(name)
        if isinstance(found, Refused):
            raise unusable_layer(name, found.reason, self)
        if isinstance(found, Layout) and name in self.silent:
            raise self._silent(name, found)
        return found

    def _silent(self, name: str, layout: Layout) -> LayerError:
        if layout.kind == TOKENS:
            why = (
                "its patch tokens receive no gradient from the logits (after it the model reads "
                "only its prefix tokens, as a class-token head does)"
            )
        else:
            why = "its positions receive no gradient from the logits"
        try:
            hint = f"explain an earlier layer such as {self.default_layer()!r} (the default)"
        except LayerError:
            hint = f"explain an earlier layer ({self.listing()})"
        return LayerError(f"layer {name!r}: {why}, so every map would be empty; {hint}")

    def default_layer(self) -> str:
        """The default target layer; see the module docstring for the rule."""
        spatial = [
            (event, layout)
            for event, layout in zip(self.events, self.layouts, strict=True)
            if isinstance(layout, Layout) and layout.grid[0] * layout.grid[1] > 1
        ]
        size = _size(self.input_hw)
        if not spatial:
            raise LayerError(
                f"no module of this model outputs a spatial feature map (NCHW or NHWC) or a "
                f"token sequence with a patch grid at {size}, so there is no layer to explain; "
                "Grad-CAM needs convolutional feature maps or a transformer's patch tokens (for "
                "sequences camserve cannot split, set `token_grid` and `prefix_tokens`)"
            )
        last, last_layout = spatial[-1]
        if last_layout.kind != NCHW:
            return self._transformer_default(spatial, last_layout)
        if self.calls[last.name] != 1:
            raise LayerError(
                f"cannot choose a default layer: the model's last spatial step is module "
                f"{last.name!r}, which runs {self.calls[last.name]} times per forward pass (it is "
                f"shared). Pass a layer explicitly ({self.listing()}) or give that step its own "
                "module in the model"
            )
        return last.name

    def _transformer_default(self, spatial: list[tuple[OutputEvent, Layout]], last: Layout) -> str:
        candidates = [
            (event, layout)
            for event, layout in spatial
            if self.calls[event.name] == 1
            and event.name not in self.silent
            and event.module != "Identity"  # it repeats the output of the module before it
            and (layout.kind != NCHW or tiles(layout.grid, self.input_hw))
        ]
        if not candidates:
            raise LayerError(
                "cannot choose a default layer: none of this model's token or feature layers "
                "has positions that receive gradient from the logits. Pass a layer explicitly "
                f"({self.listing()})"
            )
        same_width = [event for event, layout in candidates if layout.channels == last.channels]
        return (same_width or [event for event, _ in candidates])[-1].name

    def enclosing(self, name: str) -> str | None:
        """The nearest ancestor of `name` that is a valid target layer, if any."""
        valid = {spec.name for spec in self.specs()}
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:end])
            if parent in valid:
                return parent
        return None

    def listing(self, near: str | None = None) -> str:
        """A short, human-readable list of valid layers, closest matches to `near` first."""
        names = [spec.name for spec in self.specs()]
        if not names:
            return "this model has no valid target layers"
        close = difflib.get_close_matches(near, names, n=3) if near else []
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        shown = names[-_LISTED:]
        more = len(names) - len(shown)
        listed = ", ".join(shown)
        rest = f" (and {more} earlier ones)" if more else ""
        return (
            f"{hint}valid layers at {_size(self.input_hw)}: {listed}{rest}; "
            "CamEngine.layers(input_size) lists them all"
        )


def _size(input_hw: tuple[int, int]) -> str:
    return f"{input_hw[0]}x{input_hw[1]}"


def probe_input(input_hw: tuple[int, int]) -> torch.Tensor:
    """The probe's images: seeded noise, so that no layer's gradient vanishes by symmetry."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(PROBE_BATCH, PROBE_CHANNELS, *input_hw, generator=generator)


def probe(model: nn.Module, sample: torch.Tensor, hints: LayoutHints) -> Probe:
    """Runs one forward and one backward pass on `sample` (N, C, H, W), recording every module
    call, each output's layout and which layers the logits depend on.

    Exceptions from the model's forward pass propagate unchanged; the caller words them for its
    user.
    """
    input_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
    batch = int(sample.shape[0])
    leaf = sample.detach().requires_grad_()
    with torch.inference_mode(False), torch.enable_grad(), record_outputs(model) as recording:
        output = model(leaf.clone())  # a non-leaf input: the model may modify it in place
    events = tuple(recording.events)
    calls = Counter(event.name for event in events)
    detector = Detector(batch, input_hw, hints)
    layouts = tuple(detector.feed(event.name, event.shape) for event in events)
    valid = {
        event.name: layout
        for event, layout in zip(events, layouts, strict=True)
        if isinstance(layout, Layout) and calls[event.name] == 1
    }
    silent = _without_gradient(output, recording, valid)
    output_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    return Probe(input_hw, batch, events, dict(calls), output_shape, layouts, silent)


def _without_gradient(
    output: object, recording: Recording, layers: dict[str, Layout]
) -> frozenset[str]:
    """The layers whose map positions get no gradient from a random projection of the logits.

    If the model's output cannot be differentiated here, nothing is refused in advance: explain
    reports such layers itself.
    """
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return frozenset()
    silent = {name for name in layers if not recording.outputs[name].requires_grad}
    names = [name for name in layers if name not in silent]
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(output.shape, generator=generator).to(output.device, output.dtype)
    try:
        grads = torch.autograd.grad(
            output, [recording.outputs[name] for name in names], weights, allow_unused=True
        )
    except RuntimeError:
        return frozenset(silent)
    for name, grad in zip(names, grads, strict=True):
        if grad is None or not bool(layers[name].to_maps(grad).ne(0).any()):
            silent.add(name)
    return frozenset(silent)


def probe_failed(input_hw: tuple[int, int], exc: Exception) -> EngineError:
    """The error for a model that cannot run at all on a probe input of `input_hw`."""
    height, width = input_hw
    return EngineError(
        f"input_size {_size(input_hw)}: the model cannot run on a "
        f"{PROBE_CHANNELS}x{height}x{width} image ({type(exc).__name__}: {exc}); "
        "use the input size the model was built for"
    )


def unknown_layer(name: str, probe_result: Probe) -> LayerError:
    """The error for a layer name that is not a module of the model."""
    return LayerError(f"layer {name!r} is not a module of this model; {probe_result.listing(name)}")


def unusable_layer(name: str, reason: str, probe_result: Probe) -> LayerError:
    """The error for a module that exists but cannot be a target layer."""
    parent = probe_result.enclosing(name)
    alternative = f"use its enclosing block {parent!r} instead, or " if parent else ""
    return LayerError(
        f"layer {name!r} {reason}; {alternative}pick another layer: {probe_result.listing()}"
    )
