"""The engine's vocabulary: method names, requests, results and errors.

No model logic lives here; results hold torch tensors, so importing this module imports torch.
The protocol side reads the torch-free records of `camserve.server.records` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam")


class EngineError(ValueError):
    """A request the engine cannot serve; the message names the bad argument and the fix."""


class LayerError(EngineError):
    """A target layer that does not exist or cannot be explained; the message lists valid ones."""


@dataclass(frozen=True)
class RowRequest:
    """What one image of a batch asks for.

    `classes` lists the classes to explain, in order; when it is empty the engine explains the
    `top_k` highest-scoring classes instead (and `top_k` is ignored otherwise).
    """

    layer: str
    methods: tuple[str, ...] = ("gradcam",)
    classes: tuple[int, ...] = ()
    top_k: int = 1


@dataclass(frozen=True)
class RowResult:
    """One image's predictions and maps.

    Maps are float32 on the CPU, ReLU'd but not normalised, at the layer's feature resolution;
    `camserve.server.engine.shaping` upsamples and normalises them.
    """

    logits: torch.Tensor  # (num_classes,) float32
    probabilities: torch.Tensor  # (num_classes,) float32, softmax of logits
    classes: tuple[int, ...]  # the classes explained, in order
    layer: str
    maps: dict[tuple[str, int], torch.Tensor]  # (method, class) -> (h, w)


@dataclass(frozen=True)
class LayerSpec:
    """A valid target layer and the (C, h, w) map its output stands for, for one image.

    `layout` says how the output holds that map: "nchw", "nhwc" (channels last) or "tokens"
    (prefix tokens, then the h x w patch grid); see `camserve.server.engine.layouts`.
    """

    name: str
    shape: tuple[int, int, int]
    layout: str = "nchw"
