"""Which modules can be explained, and which one to use by default.

One probe forward pass at a given input size, with a hook on every submodule (the root
excluded), records each module call in completion order. From it:

- A module is a valid target layer when it runs exactly once per forward pass and outputs a 4-D
  (N, C, H, W) tensor. Modules called several times (a shared activation such as torchvision
  BasicBlock's `relu`) have no single feature map; modules returning tuples or other objects have
  none either.
- The default layer is the last valid one whose output is spatial (H * W > 1) and after which only
  non-spatial processing follows: it must be the module behind the last spatial output of the whole
  pass. Containers finish after their children, so for torchvision's ResNet this is `layer4`. If the
  last spatial output comes from a module that runs several times (a head activation shared with
  the stem), there is no safe default and the engine asks for an explicit layer instead.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from camserve.server.engine.hooks import OutputEvent, record_outputs
from camserve.server.engine.types import EngineError, LayerError, LayerSpec

PROBE_CHANNELS = 3
# Two images, not one: a model that squeezes its batch dimension would mislead a batch-1 probe.
PROBE_BATCH = 2
_LISTED = 20  # names shown in an error message before "... and N more"


@dataclass(frozen=True)
class Probe:
    """What one forward pass at `input_hw` revealed about the model's modules."""

    input_hw: tuple[int, int]
    batch: int  # images in the probe's input
    events: tuple[OutputEvent, ...]
    calls: dict[str, int]
    output_shape: tuple[int, ...] | None  # the model's own output, None if not a tensor

    def _feature_map(self, event: OutputEvent) -> bool:
        """A 4-D output with one entry per image of the batch."""
        return event.shape is not None and len(event.shape) == 4 and event.shape[0] == self.batch

    def specs(self) -> list[LayerSpec]:
        """Every valid target layer, in forward-completion order."""
        return [
            LayerSpec(event.name, (event.shape[1], event.shape[2], event.shape[3]))
            for event in self.events
            if event.shape is not None and self._feature_map(event) and self.calls[event.name] == 1
        ]

    def default_layer(self) -> str:
        """The default target layer; see the module docstring for the rule."""
        spatial = [
            event
            for event in self.events
            if event.shape is not None
            and self._feature_map(event)
            and event.shape[2] * event.shape[3] > 1
        ]
        size = _size(self.input_hw)
        if not spatial:
            raise LayerError(
                f"no module of this model outputs a spatial (N, C, H, W) feature map at {size}, "
                "so there is no layer to explain; Grad-CAM needs a convolutional feature layer"
            )
        last = spatial[-1]
        if self.calls[last.name] != 1:
            raise LayerError(
                f"cannot choose a default layer: the model's last spatial step is module "
                f"{last.name!r}, which runs {self.calls[last.name]} times per forward pass (it is "
                f"shared). Pass a layer explicitly ({self.listing()}) or give that step its own "
                "module in the model"
            )
        return last.name

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


def probe(model: nn.Module, sample: torch.Tensor) -> Probe:
    """Runs one inference forward pass on `sample` (N, C, H, W) and records every module call.

    Exceptions from the model propagate unchanged; the caller words them for its user.
    """
    input_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
    with torch.inference_mode(), record_outputs(model) as events:
        output = model(sample)
    calls = Counter(event.name for event in events)
    output_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    return Probe(input_hw, int(sample.shape[0]), tuple(events), dict(calls), output_shape)


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
