"""The one table of CAM methods: what each is, what its pass must produce, what it costs.

Every method camserve serves is one `Method` entry of `REGISTRY`, in wire order. An entry states
- its name and its wire value (`camserve.v1.methods`, the protocol's table, is checked against
  these entries by a test);
- what the explain pass must produce for it (`Produces`): the target layer's activations, with
  or without their gradients, the gradient at the input (plain or guided), forward-only rows
  after the layer or of the whole model, one per channel, built from that layer's activations,
  or rows of the whole model with their gradient at the input (SmoothGrad's noisy copies,
  Integrated Gradients' path);
- the layer layouts it accepts (`camserve.server.engine.layouts`), checked by request
  validation before anything is queued;
- its rows and cost per image (`rows_per_copy`, `cost_per_copy`);
- the extra work it needs after the pass (`ChannelRows`: how its rows are built and how its
  maps are made from their scores; `PixelMethod.path` for gradient rows, run by
  `camserve.server.engine.gradient_rows`);
- for a pixel attribution (`PixelMethod`), how its (3, H, W) attribution is made and reduced.

Request validation, admission, GetModel, the follow-up work and the engine read these entries;
nothing else branches on a method's name. A new method is an entry here and its functions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from camserve.server.engine import methods as kernels
from camserve.server.engine import saliency
from camserve.server.engine.ablation import ablated_rows, ablation_cam
from camserve.server.engine.layouts import LAYOUTS, NCHW
from camserve.server.engine.methods import CamMethod
from camserve.server.engine.saliency import Attribution
from camserve.server.engine.scorecam import masked_inputs, score_cam
from camserve.server.engine.types import EngineError
from camserve.v1 import explain_pb2 as pb


class Produces(enum.Enum):
    """What the explain pass must produce for a method."""

    LAYER_ACTIVATIONS = "the target layer's activations"
    LAYER_GRADIENTS = "the target layer's activations and their gradients"
    ROWS_AFTER_LAYER = "forward-only rows of the modules after the layer, one per channel"
    ROWS_OF_MODEL = "forward-only rows of the whole model, one per channel"
    INPUT_GRADIENT = "the gradient of the class score at the input"
    GUIDED_GRADIENT = "the guided-backprop gradient of the class score at the input"
    GRADIENT_ROWS = "rows of the whole model after the pass, each with its gradient at the input"

    @property
    def from_pass(self) -> bool:
        """Whether the maps come from the explain pass itself (no rows after it)."""
        return self in _FROM_PASS


_FROM_PASS = frozenset(
    {
        Produces.LAYER_ACTIVATIONS,
        Produces.LAYER_GRADIENTS,
        Produces.INPUT_GRADIENT,
        Produces.GUIDED_GRADIENT,
    }
)
# What one row with its gradient at the input weighs in forward passes: with frozen parameters
# the backward computes only gradients of activations, about the forward's work again.
GRADIENT_ROW_COST = 2


@dataclass(frozen=True)
class PixelMethod:
    """A pixel attribution: how its (3, H, W) attribution is made and reduced to a map.

    `attribution` makes it from the pass (methods made by the pass); `path` names the rows
    after the pass that make it instead ("noise": SmoothGrad's copies, "path": Integrated
    Gradients' points). `uses_cam`: it needs the target layer's Grad-CAM too; `guided`: the
    guided gradient (ReLU and ReLU6 models only, `activations`).
    """

    reduction: str  # the default channel reduction (`saliency.REDUCTIONS`)
    attribution: Attribution | None = None
    path: str = ""
    uses_cam: bool = False
    guided: bool = False


# Rows (R, ...) for channels [start, stop) of one image's (C, h, w) activation; the image is its
# (3, H, W) model input.
BuildRows = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
# Maps (K, h, w) from the activation (C, h, w), the K explained classes' own logits (K,), their
# logits on every row (K, C), and eigen_smooth.
MapsFromScores = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class ChannelRows:
    """The forward-only work after the pass: one row per channel of the target layer."""

    build: BuildRows
    maps: MapsFromScores


@dataclass(frozen=True)
class Method:
    """One method: see the module docstring for what each field states."""

    name: str
    wire: int  # its camserve.v1.Method value
    produces: Produces
    layouts: frozenset[str]  # the layer layouts it can explain
    kernel: CamMethod | None = None  # the maps from the pass itself, when `produces.from_pass`
    rows: ChannelRows | None = None  # the work after the pass, otherwise
    pixel: PixelMethod | None = None  # a pixel attribution (instead of a kernel or rows)

    def __post_init__(self) -> None:
        made = [self.kernel is not None, self.rows is not None, self.pixel is not None]
        by_pass = self.kernel is not None or (self.pixel is not None and not self.pixel.path)
        if sum(made) != 1 or self.produces.from_pass != by_pass:
            raise ValueError(
                f"method {self.name!r}: a method made by the pass has a kernel or a pass pixel "
                "attribution, one made by rows after it ChannelRows or a pixel path, never two"
            )

    @property
    def needs_gradients(self) -> bool:
        """Whether the pass must differentiate the target layer (Grad-CAM for guided_gradcam)."""
        uses_cam = self.pixel is not None and self.pixel.uses_cam
        return self.produces is Produces.LAYER_GRADIENTS or uses_cam

    @property
    def input_gradient(self) -> str:
        """ "plain" or "guided" when the pass must differentiate its input for this method."""
        if self.produces is Produces.INPUT_GRADIENT:
            return "plain"
        return "guided" if self.produces is Produces.GUIDED_GRADIENT else ""

    @property
    def gradient_rows(self) -> bool:
        """Whether its maps come from rows with their input gradient after the pass."""
        return self.produces is Produces.GRADIENT_ROWS

    @property
    def guided(self) -> bool:
        return self.pixel is not None and self.pixel.guided

    @property
    def runs_tail(self) -> bool:
        """Whether its rows run only the modules after the layer (and the tail is measured)."""
        return self.produces is Produces.ROWS_AFTER_LAYER

    def accepts(self, layout: str) -> bool:
        return layout in self.layouts

    def rows_per_copy(self, channels: int, gradient_rows: int = 0) -> int:
        """Model rows per explained copy of an image: its pass row, plus one per channel, or
        plus `gradient_rows` (SmoothGrad's copies, IG's points and baseline)."""
        if self.produces.from_pass:
            return 1
        return 1 + (gradient_rows if self.gradient_rows else channels)

    def cost_per_copy(self, channels: int, tail_fraction: float, gradient_rows: int = 0) -> float:
        """Forward passes per explained copy; a row after the layer costs `tail_fraction`, a
        row with its input gradient `GRADIENT_ROW_COST`."""
        if self.input_gradient:
            return float(GRADIENT_ROW_COST)
        if self.produces.from_pass:
            return 1.0
        if self.gradient_rows:
            return 1.0 + GRADIENT_ROW_COST * gradient_rows
        per_row = tail_fraction if self.runs_tail else 1.0
        return 1.0 + channels * per_row


def _ablated(image: torch.Tensor, activation: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return ablated_rows(activation, start, stop)


def _masked(image: torch.Tensor, activation: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return masked_inputs(image, activation, start, stop)


def _ablation_maps(
    activation: torch.Tensor, original: torch.Tensor, scores: torch.Tensor, eigen_smooth: bool
) -> torch.Tensor:
    return ablation_cam(activation, original, scores, eigen_smooth=eigen_smooth)


def _score_maps(
    activation: torch.Tensor, original: torch.Tensor, scores: torch.Tensor, eigen_smooth: bool
) -> torch.Tensor:
    return score_cam(activation, scores, eigen_smooth=eigen_smooth)


ANY_LAYOUT = frozenset(LAYOUTS)
_GRADIENTS = Produces.LAYER_GRADIENTS
_INPUT = Produces.INPUT_GRADIENT
_GUIDED = Produces.GUIDED_GRADIENT
_ROWS = Produces.GRADIENT_ROWS

REGISTRY: tuple[Method, ...] = (
    Method("gradcam", pb.METHOD_GRADCAM, _GRADIENTS, ANY_LAYOUT, kernels.GRADCAM),
    Method("gradcampp", pb.METHOD_GRADCAMPP, _GRADIENTS, ANY_LAYOUT, kernels.GRADCAMPP),
    Method("xgradcam", pb.METHOD_XGRADCAM, _GRADIENTS, ANY_LAYOUT, kernels.XGRADCAM),
    Method("hirescam", pb.METHOD_HIRESCAM, _GRADIENTS, ANY_LAYOUT, kernels.HIRESCAM),
    Method("layercam", pb.METHOD_LAYERCAM, _GRADIENTS, ANY_LAYOUT, kernels.LAYERCAM),
    Method(
        "gradcamelementwise",
        pb.METHOD_GRADCAM_ELEMENTWISE,
        _GRADIENTS,
        ANY_LAYOUT,
        kernels.GRADCAM_ELEMENTWISE,
    ),
    Method(
        "eigencam", pb.METHOD_EIGENCAM, Produces.LAYER_ACTIVATIONS, ANY_LAYOUT, kernels.EIGENCAM
    ),
    Method("eigengradcam", pb.METHOD_EIGENGRADCAM, _GRADIENTS, ANY_LAYOUT, kernels.EIGENGRADCAM),
    # Ablated copies of the layer's output feed the modules after it, which take NCHW maps only.
    Method(
        "ablationcam",
        pb.METHOD_ABLATIONCAM,
        Produces.ROWS_AFTER_LAYER,
        frozenset({NCHW}),
        rows=ChannelRows(_ablated, _ablation_maps),
    ),
    Method(
        "scorecam",
        pb.METHOD_SCORECAM,
        Produces.ROWS_OF_MODEL,
        ANY_LAYOUT,
        rows=ChannelRows(_masked, _score_maps),
    ),
    # Pixel attributions read no layer (guided_gradcam reads its Grad-CAM): any layout.
    Method(
        "saliency",
        pb.METHOD_SALIENCY,
        _INPUT,
        ANY_LAYOUT,
        pixel=PixelMethod("max_abs", saliency.gradient),
    ),
    Method(
        "input_x_gradient",
        pb.METHOD_INPUT_X_GRADIENT,
        _INPUT,
        ANY_LAYOUT,
        pixel=PixelMethod("sum", saliency.input_x_gradient),
    ),
    Method(
        "smoothgrad",
        pb.METHOD_SMOOTHGRAD,
        _ROWS,
        ANY_LAYOUT,
        pixel=PixelMethod("max_abs", path="noise"),
    ),
    Method(
        "integrated_gradients",
        pb.METHOD_INTEGRATED_GRADIENTS,
        _ROWS,
        ANY_LAYOUT,
        pixel=PixelMethod("sum", path="path"),
    ),
    Method(
        "guided_backprop",
        pb.METHOD_GUIDED_BACKPROP,
        _GUIDED,
        ANY_LAYOUT,
        pixel=PixelMethod("max_abs", saliency.guided_gradient, guided=True),
    ),
    Method(
        "guided_gradcam",
        pb.METHOD_GUIDED_GRADCAM,
        _GUIDED,
        ANY_LAYOUT,
        pixel=PixelMethod("max_abs", saliency.guided_gradcam, uses_cam=True, guided=True),
    ),
)
BY_NAME: Mapping[str, Method] = {method.name: method for method in REGISTRY}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# The maps the explain pass makes from the target layer (the CAMs), the pixel attributions it
# makes from the gradient at the input, and the methods made by rows after it.
PASS_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.kernel is not None)
PIXEL_PASS_METHODS: tuple[str, ...] = tuple(
    m.name for m in REGISTRY if m.pixel is not None and m.produces.from_pass
)
ROW_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if not m.produces.from_pass)
PIXEL_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.pixel is not None)
GUIDED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.guided)
# The pixel methods for any differentiable model: what a guided method's refusal suggests.
UNGUIDED_PIXEL_METHODS: tuple[str, ...] = tuple(
    m.name for m in REGISTRY if m.pixel is not None and not m.guided
)
# The method whose unreduced attribution is the plain gradient at the input: the rows of
# SmoothGrad and Integrated Gradients ask for it.
PLAIN_GRADIENT = "saliency"


def method(name: str) -> Method:
    """The entry named `name`, or an EngineError listing the names there are."""
    found = BY_NAME.get(name)
    if found is None:
        raise EngineError(f"unknown method {name!r}; choose from {NAMES}")
    return found


def needing_rows(names: tuple[str, ...]) -> tuple[Method, ...]:
    """The entries of `names` that need forward-only rows per channel after the pass, in order."""
    return tuple(m for m in map(method, names) if m.rows is not None)


def needing_gradient_rows(names: tuple[str, ...]) -> tuple[Method, ...]:
    """The entries of `names` made by rows with their input gradient after the pass, in order."""
    return tuple(m for m in map(method, names) if m.gradient_rows)


def pass_methods(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names among `names` whose maps the explain pass makes itself, in order."""
    return tuple(name for name in names if method(name).produces.from_pass)
