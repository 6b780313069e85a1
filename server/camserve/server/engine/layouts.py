"""Where a layer's output keeps its spatial positions, and how it becomes an (N, C, h, w) map.

Three layouts, so that CNNs and vision transformers explain the same way:

- `nchw`: convolutional feature maps (N, C, h, w), used as they are;
- `nhwc`: channels-last maps (N, h, w, C), as in the Swin stages of torchvision and timm;
- `tokens`: sequences (N, P + h * w, C) of P prefix tokens (class, distillation, register)
  followed by an h x w patch grid in row-major order, as in ViT and DeiT. The prefix is dropped
  and the grid restored.

`Layout.to_maps` returns views, so the methods and the shaping code only ever see (..., C, h, w)
maps and need no knowledge of transformers.

Detection (`Detector`), per module output of the engine's probe pass, from shapes first and from
what the model or its configuration says (`LayoutHints`) where shapes cannot tell:

- A 4-D output is read as NCHW or NHWC depending on which reading gives a grid that tiles the
  input with one stride on both axes (a 7x7 grid tiles 224x224 with stride 32; a 7x768 grid tiles
  nothing). When both readings fit (the channel count equals a grid side), the model decides:
  timm models declaring `output_fmt = "NHWC"` and torchvision's Swin are NHWC, others NCHW. When
  neither fits, the output is read as NCHW, as before layouts existed.
- A 3-D output (N, L, C) is a token sequence when L = P + h * w for a grid taken, in order, from
  the configured `token_grid`, the model's patch size and the input size, the grids of the
  feature maps seen earlier in the pass (a patch embedding's convolution), or a square. P is the
  configured or declared prefix count (timm's `num_prefix_tokens`, torchvision ViT's class token)
  or 0 (a patch embedding's own output has no prefix yet); when the model declares none, any P up
  to `MAX_PREFIX_TOKENS` is accepted. A sequence that fits no grid has no layout and the engine
  refuses it with a message saying which settings fix it.
- A per-layer override (`LayoutHints.layers`) replaces the detection for that layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from camserve.server.engine.types import EngineError

NCHW = "nchw"
NHWC = "nhwc"
TOKENS = "tokens"
LAYOUTS = (NCHW, NHWC, TOKENS)
# Class, distillation and register tokens together stay well below this in known models.
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class Layout:
    """How one layer lays out its output for one image, and the (C, h, w) map it stands for."""

    kind: str
    channels: int
    grid: tuple[int, int]
    prefix: int = 0  # tokens before the patch grid; tokens only

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w), the map each image's output becomes."""
        return (self.channels, self.grid[0], self.grid[1])

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One image's raw output shape in this layout."""
        height, width = self.grid
        if self.kind == NHWC:
            return (height, width, self.channels)
        if self.kind == TOKENS:
            return (self.prefix + height * width, self.channels)
        return (self.channels, height, width)

    def to_maps(self, tensor: torch.Tensor) -> torch.Tensor:
        """(..., *item_shape) -> (..., C, h, w) as a view: prefix tokens dropped, grid restored."""
        if self.kind == NHWC:
            return tensor.movedim(-1, -3)
        if self.kind == TOKENS:
            patches = tensor[..., self.prefix :, :]
            return patches.unflatten(-2, self.grid).movedim(-1, -3)
        return tensor


@dataclass(frozen=True)
class LayoutHints:
    """What the configuration (or the model itself) says about its layers' layouts.

    Every field is optional; unset fields leave the decision to detection. `layers` maps a module
    name to "nchw", "nhwc" or "tokens"; `prefix_tokens` counts the tokens before the patch grid;
    `token_grid` is the (h, w) patch grid at the served input size; `patch_size` gives the grid
    at any input size; `nhwc` says that 4-D outputs whose shape fits both readings are NHWC.
    """

    layers: Mapping[str, str] = field(default_factory=dict)
    prefix_tokens: int | None = None
    token_grid: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None
    nhwc: bool = False

    def __post_init__(self) -> None:
        for name, kind in self.layers.items():
            if kind not in LAYOUTS:
                raise EngineError(
                    f"layout {kind!r} for layer {name!r} is unknown; use one of {list(LAYOUTS)}"
                )
        if self.prefix_tokens is not None and (
            not _is_int(self.prefix_tokens) or self.prefix_tokens < 0
        ):
            raise EngineError(f"prefix_tokens must be an int >= 0, got {self.prefix_tokens!r}")
        for key in ("token_grid", "patch_size"):
            value = getattr(self, key)
            if value is not None and (
                len(value) != 2 or not all(_is_int(v) and v >= 1 for v in value)
            ):
                raise EngineError(f"{key} must be two ints >= 1 (height, width), got {value!r}")

    def over(self, declared: LayoutHints) -> LayoutHints:
        """These hints, with `declared` filling the fields left unset."""
        return LayoutHints(
            layers={**declared.layers, **self.layers},
            prefix_tokens=(
                self.prefix_tokens if self.prefix_tokens is not None else declared.prefix_tokens
            ),
            token_grid=self.token_grid or declared.token_grid,
            patch_size=self.patch_size or declared.patch_size,
            nhwc=self.nhwc or declared.nhwc,
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def declared_hints(model: nn.Module) -> LayoutHints:
    """What timm and torchvision models say about themselves: prefix tokens, patch size, NHWC.

    timm's ViT family declares `num_prefix_tokens` and `patch_embed.patch_size`; torchvision's
    VisionTransformer has a `class_token` and a `patch_size`; timm models running NHWC stages
    declare `output_fmt`, and torchvision's Swin lives in its own module.
    """
    declared = getattr(model, "num_prefix_tokens", None)
    prefix = declared if isinstance(declared, int) and not isinstance(declared, bool) else None
    if prefix is None and isinstance(getattr(model, "class_token", None), torch.Tensor):
        prefix = 1
    patch_embed = getattr(model, "patch_embed", None)
    patch = _pair(getattr(patch_embed, "patch_size", None)) or _pair(
        getattr(model, "patch_size", None)
    )
    output_fmt = getattr(model, "output_fmt", "")
    nhwc = str(getattr(output_fmt, "value", output_fmt)).upper() == "NHWC" or (
        type(model).__module__ == "torchvision.models.swin_transformer"
    )
    return LayoutHints(prefix_tokens=prefix, patch_size=patch, nhwc=nhwc)


def tiles(grid: tuple[int, int], input_hw: tuple[int, int]) -> bool:
    """Whether an h x w grid covers an H x W input with one stride s on both axes.

    Each side n must be floor(S / s) or ceil(S / s), so s lies in (S / (n + 1), S / (n - 1)); the
    grid tiles the input when those intervals of both axes overlap.
    """
    low, high = 0.0, math.inf
    for cells, size in zip(grid, input_hw, strict=True):
        if not 1 <= cells <= size:
            return False
        low = max(low, size / (cells + 1))
        if cells > 1:
            high = min(high, size / (cells - 1))
    return low < high


@dataclass(frozen=True)
class Refused:
    """An output that looks like a layer but has no usable layout, and why (for the engine's
    refusal, which also says how to configure it)."""

    reason: str


class Detector:
    """Assigns layouts to a probe pass's outputs, fed in completion order."""

    def __init__(self, batch: int, input_hw: tuple[int, int], hints: LayoutHints) -> None:
        self._batch = batch
        self._input_hw = input_hw
        self._hints = hints
        self._grids: list[tuple[int, int]] = []  # grids of maps seen so far, most recent first

    def feed(self, name: str, shape: tuple[int, ...] | None) -> Layout | Refused | None:
        """The layout of one output; Refused for a sequence that fits no grid or a layout
        override that does not fit the output; None when the output is not one map or sequence
        per image."""
        if shape is None or len(shape) not in (3, 4) or shape[0] != self._batch:
            return None
        override = self._hints.layers.get(name)
        if override is not None and (override == TOKENS) != (len(shape) == 3):
            return Refused(
                f"is configured as {override!r} in `layer_layouts` but outputs a tensor of shape "
                f"{tuple(shape)}; nchw and nhwc fit 4-D outputs, tokens fits (N, L, C) sequences"
            )
        if len(shape) == 4:
            layout = self._map(shape, override)
            if tiles(layout.grid, self._input_hw):
                if layout.grid in self._grids:
                    self._grids.remove(layout.grid)
                self._grids.insert(0, layout.grid)
            return layout
        return self._tokens(shape)

    def _map(self, shape: tuple[int, ...], override: str | None) -> Layout:
        first, second, third = shape[1], shape[2], shape[3]
        if override is None:
            nchw = tiles((second, third), self._input_hw)
            nhwc = tiles((first, second), self._input_hw)
            override = NHWC if nhwc and (not nchw or self._hints.nhwc) else NCHW
        if override == NHWC:
            return Layout(NHWC, third, (first, second))
        return Layout(NCHW, first, (second, third))

    def _tokens(self, shape: tuple[int, ...]) -> Layout | Refused:
        length, channels = shape[1], shape[2]
        hints = self._hints
        if hints.prefix_tokens is not None:
            prefixes: tuple[int, ...] = tuple(dict.fromkeys((0, hints.prefix_tokens)))
        else:
            prefixes = tuple(range(MAX_PREFIX_TOKENS + 1))
        candidates: list[tuple[tuple[int, int], str]] = []
        if hints.token_grid is not None:
            candidates.append((hints.token_grid, "token_grid"))
        else:
            if hints.patch_size is not None:
                grid = (
                    self._input_hw[0] // hints.patch_size[0],
                    self._input_hw[1] // hints.patch_size[1],
                )
                candidates.append((grid, "the patch size"))
            candidates.extend((grid, "an earlier feature map") for grid in self._grids)
            for prefix in prefixes:
                side = math.isqrt(max(length - prefix, 0))
                if side >= 1 and side * side == length - prefix:
                    candidates.append(((side, side), "a square"))
                    break
        for (height, width), _ in candidates:
            prefix = length - height * width
            if height * width >= 1 and prefix in prefixes:
                return Layout(TOKENS, channels, (height, width), prefix)
        tried = ", ".join(f"{h}x{w} from {origin}" for (h, w), origin in candidates)
        if hints.prefix_tokens is not None:
            allowed = f"{hints.prefix_tokens} (or 0) prefix tokens"
        else:
            allowed = f"at most {MAX_PREFIX_TOKENS} prefix tokens"
        height, width = self._input_hw
        return Refused(
            f"outputs a sequence of {length} tokens of width {channels} that does not split into "
            f"{allowed} and a patch grid at input {height}x{width}"
            + (f" (tried {tried})" if tried else "")
            + ". Set `token_grid = [h, w]` and `prefix_tokens = P` (P + h * w tokens) in the "
            "model's [[models]] entry, or LayoutHints(token_grid=..., prefix_tokens=...) for a "
            "CamEngine; or pick another layer"
        )
