"""The engine's vocabulary: requests, results and errors (methods: `registry`).

No model logic lives here; results hold torch tensors, so importing this module imports torch.
The protocol side reads the torch-free records of `camserve.server.records` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from camserve.v1.methods import DEFAULT_METHOD

# What a row may ask the explain pass to send back besides its maps (`RowRequest.outputs`); the
# pass declares how it makes each (`explain_pass.OUTPUTS`).
ACTIVATIONS = "activations"  # the target layer's output as a (C, h, w) map, float32
# Channel selections of a feature map (`FeatureAsk.selection`).
FIRST, TOP_MEAN, TOP_GRADCAM, INDICES = "first", "top_mean", "top_gradcam", "indices"
SELECTIONS = (FIRST, TOP_MEAN, TOP_GRADCAM, INDICES)


@dataclass(frozen=True)
class FeatureAsk:
    """One layer's activations a row asks for: which channels, `count` of them (or `indices`).

    TOP_GRADCAM ranks channels by the Grad-CAM weight of the row's first explained class at this
    layer, so it needs the layer's gradient; the other selections need only the forward pass.
    """

    layer: str
    selection: str = FIRST
    count: int = 16
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Inspection:
    """What a row asks to see inside the model: layers' activations and attention gates' values.

    They come back in `RowResult.outputs` under the keys of `feature_keys` and `gate_key`.
    """

    features: tuple[FeatureAsk, ...] = ()
    gates: tuple[str, ...] = ()

    @property
    def needs_gradients(self) -> bool:
        return any(ask.selection == TOP_GRADCAM for ask in self.features)


@dataclass(frozen=True)
class FeatureKeys:
    """Where one layer's results sit in `RowResult.outputs`."""

    maps: str  # (k, h, w) float32, the selected channels at feature resolution
    channels: str  # (k,) int64, their indices
    means: str  # (C,) float32, every channel's spatial mean
    maxes: str  # (C,) float32, every channel's spatial maximum


def feature_keys(layer: str) -> FeatureKeys:
    return FeatureKeys(f"features/{layer}", f"channels/{layer}", f"means/{layer}", f"maxes/{layer}")


def gate_key(name: str) -> str:
    """Where a gate's values sit in `RowResult.outputs`: (C,) or (H, W) float32."""
    return f"gate/{name}"


# Each pixel method's unreduced attributions (classes, 3, H, W), float32, under
# `attribution_kind(method)` in `RowResult.outputs`.
ATTRIBUTIONS = "attributions"


def attribution_kind(method: str) -> str:
    """The `RowResult.outputs` key of a pixel method's unreduced attributions."""
    return f"{ATTRIBUTIONS}.{method}"


class EngineError(ValueError):
    """A request the engine cannot serve; the message names the bad argument and the fix."""


class LayerError(EngineError):
    """A target layer that does not exist or cannot be explained; the message lists valid ones."""


class ModelFault(RuntimeError):
    """The model, not the request, failed: non-finite logits or maps, a model in a bad state.

    Kept apart from `EngineError` because the caller cannot fix it: the server answers it as a
    fault (INTERNAL) and counts it against the model's health.
    """


@dataclass(frozen=True)
class RowRequest:
    """What one image of a batch asks for.

    `classes` lists the classes to explain, in order; when it is empty the engine explains the
    `top_k` highest-scoring classes instead (and `top_k` is ignored otherwise).

    `eigen_smooth` replaces each method's sum over channels by the first principal component of
    its per-channel terms (see `camserve.server.engine.eigen`). `aug_smooth` explains six
    augmented copies of the image in the same pass and averages their maps (see
    `camserve.server.engine.augment`); the maps then come back at input resolution.
    `keep_activations` hands back what gradient-free methods need (`RowResult.retained`); such a
    row may leave `methods` empty. `outputs` names what else the pass should send back for the
    row, by kind (`ACTIVATIONS`, `ATTRIBUTIONS`), in `RowResult.outputs`. `inspection` asks for
    layers' activations and gates' values (`Inspection`); a row with an inspection may leave
    `methods` empty, and a batch of such rows alone runs forward only (`inspection`).
    `reduction` names how pixel attributions become maps (`saliency.REDUCTIONS`; empty: each
    method's own).
    """

    layer: str
    methods: tuple[str, ...] = (DEFAULT_METHOD,)
    classes: tuple[int, ...] = ()
    top_k: int = 1
    eigen_smooth: bool = False
    aug_smooth: bool = False
    keep_activations: bool = False
    outputs: tuple[str, ...] = ()
    inspection: Inspection | None = None
    reduction: str = ""


@dataclass(frozen=True)
class Augmentation:
    """One test-time augmentation of aug_smooth: a horizontal flip, then a brightness factor."""

    flip: bool
    factor: float


@dataclass(frozen=True)
class Retained:
    """What the gradient-free methods need of one explained (possibly augmented) image.

    Tensors stay on the engine's device so follow-up rows are built there without a copy.
    `augmentation` is None for a row without aug_smooth, else the one that made `image` from the
    request's image.
    """

    image: torch.Tensor  # (3, H, W) the model input this copy was explained on
    activation: torch.Tensor  # (C, h, w) the target layer's output as a map, detached
    logits: torch.Tensor  # (num_classes,) float32 on the CPU, this copy's own logits
    augmentation: Augmentation | None = None
    layout: str = "nchw"  # the layer's layout (`layouts`): only an NCHW map is its output too


@dataclass(frozen=True)
class RowResult:
    """One image's predictions and maps.

    Maps are float32 on the CPU, ReLU'd but not normalised, at the layer's feature resolution;
    `camserve.server.engine.shaping` upsamples and normalises them. With aug_smooth they are at
    input resolution instead: the mean of the augmented copies' maps, each first upsampled and
    min-max normalised (pytorch-grad-cam's `aug_smooth`), so their values lie in [0, 1].

    `retained` holds one entry per explained copy of the image when the row asked for
    `keep_activations` (six with aug_smooth, in `augment.AUGMENTATIONS` order), else none.
    """

    logits: torch.Tensor  # (num_classes,) float32
    probabilities: torch.Tensor  # (num_classes,) float32, softmax of logits
    classes: tuple[int, ...]  # the classes explained, in order
    layer: str
    maps: dict[tuple[str, int], torch.Tensor]  # (method, class) -> (h, w)
    retained: tuple[Retained, ...] = ()
    # What the row asked for besides its maps, by kind (`RowRequest.outputs`), on the CPU; with
    # aug_smooth, the unaugmented copy's.
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """A valid target layer and the (C, h, w) map its output stands for, for one image.

    `layout` says how the output holds that map: "nchw", "nhwc" (channels last) or "tokens"
    (prefix tokens, then the h x w patch grid); see `camserve.server.engine.layouts`.
    """

    name: str
    shape: tuple[int, int, int]
    layout: str = "nchw"
