"""Building and checking ExplainRequests: shared by the sync and asyncio clients.

Arguments are checked here, before anything is sent, with messages that name the argument and
what it accepts; the server checks again (the labels and layers only it knows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, cast

from camserve.client.images import ImageInput, to_wire
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import DEFAULT_METHOD, METHOD_BY_NAME
from camserve.v1.scores import CURVE_SCORES, SCORE_BY_NAME

Target = int | str | Sequence[int | str] | None
Methods = str | Sequence[str]
Scores = str | Sequence[str]
Resolution = str | tuple[int, int]

METHODS = cast("dict[str, pb.Method]", METHOD_BY_NAME)
SCORES = cast("dict[str, pb.Score]", SCORE_BY_NAME)
# Short names the SDK and the CLI accept for the scores, beside their full names.
SCORE_ALIASES: dict[str, str] = {
    "confidence": "confidence_change",
    "deletion": "deletion_auc",
    "insertion": "insertion_auc",
}
RESOLUTIONS: dict[str, pb.Resolution] = {
    "original": pb.RESOLUTION_ORIGINAL,
    "input": pb.RESOLUTION_INPUT,
    "feature": pb.RESOLUTION_FEATURE_MAP,
}
SELECTIONS: dict[str, pb.ChannelSelection] = {
    "first": pb.CHANNEL_SELECTION_FIRST,
    "top_mean": pb.CHANNEL_SELECTION_TOP_MEAN,
    "top_gradcam": pb.CHANNEL_SELECTION_TOP_GRADCAM,
}
INSPECT_RESOLUTIONS: dict[str, pb.Resolution] = {
    "feature": pb.RESOLUTION_FEATURE_MAP,
    "input": pb.RESOLUTION_INPUT,
    "original": pb.RESOLUTION_ORIGINAL,
}
# The pixel attributions' named options (SaliencyOptions), by the SDK's names.
REDUCTIONS: dict[str, pb.Reduction] = {
    "max_abs": pb.REDUCTION_MAX_ABS,
    "sum_abs": pb.REDUCTION_SUM_ABS,
    "sum": pb.REDUCTION_SUM,
}
NORMALISATIONS: dict[str, pb.Normalisation] = {
    "min_max": pb.NORMALISATION_MIN_MAX,
    "percentile_99": pb.NORMALISATION_PERCENTILE_99,
}
QUADRATURES: dict[str, pb.Quadrature] = {
    "gausslegendre": pb.QUADRATURE_GAUSS_LEGENDRE,
    "riemann_left": pb.QUADRATURE_RIEMANN_LEFT,
    "riemann_right": pb.QUADRATURE_RIEMANN_RIGHT,
    "riemann_middle": pb.QUADRATURE_RIEMANN_MIDDLE,
    "riemann_trapezoid": pb.QUADRATURE_RIEMANN_TRAPEZOID,
}
BASELINES: dict[str, pb.Baseline] = {"zero": pb.BASELINE_ZERO, "black": pb.BASELINE_BLACK}
DTYPES: dict[str, pb.DType] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "uint8": pb.DTYPE_UINT8,
}


class ExplainKwargs(TypedDict, total=False):
    """The keyword options of `explain`, `explain_batch` and `explain_many` of both clients.

    `model`: a hosted model's name (default: the server's default). `target`: class index,
    label, or a sequence of them (default: the predicted class); `top_k`: the k most probable
    classes instead. `methods`: one or more of gradcam, gradcampp, xgradcam, hirescam, layercam,
    gradcamelementwise, eigencam, eigengradcam, ablationcam, scorecam (the last two are
    gradient-free and cost a forward row per channel of the layer), and the pixel attributions
    saliency, input_x_gradient, smoothgrad, integrated_gradients, guided_backprop and
    guided_gradcam (maps at the input's resolution). `layer`: default the model's.
    `resolution`: "original", "input", "feature" or (height, width). `dtype`: "float32",
    "float16" or "uint8". `raw`: unnormalised maps. `overlay`: also get the server's PNG overlay
    of the first heatmap. `top_predictions`: predictions returned. `eigen_smooth`: each map is
    the first principal component of its terms. `aug_smooth`: average the maps of six augmented
    copies (six times the cost; not with resolution "feature"). `scores`: faithfulness scores of
    every heatmap, one or more of confidence_change, deletion_auc, insertion_auc (or
    "confidence", "deletion", "insertion"), read from `Explanation.scores`. `score_steps`: steps
    of the deletion and insertion curves (default the server's, 20). `score_curves`: also get
    those curves (`Explanation.curves`).
    `feature_layers`: layers whose activations to return (`Explanation.feature_maps`);
    `channels`: how many channels per layer (default 16), or a sequence of channel indices;
    `channel_selection`: "first", "top_mean" or "top_gradcam" (by the explained class's Grad-CAM
    weight); `feature_resolution`: "feature", "input" or "original"; `feature_dtype`;
    `feature_raw`: activations as they are instead of each channel min-max normalised. `gates`:
    True for every attention gate's values, or a sequence of gate names (`Explanation.gates`);
    `gate_resolution`: where spatial gates are drawn ("feature", "input", "original").
    `heatmaps`: False returns only feature maps and gates (no heatmaps, no predictions; the
    server runs the model forward only, and only as deep as needed).
    Pixel attribution options (None: the server's default): `samples` (SmoothGrad's noisy
    copies, 25), `noise` (their sigma over the input's range, 0.15), `seed` (SmoothGrad's noise;
    None: drawn per request), `steps` (Integrated Gradients' points, 50), `quadrature`
    (gausslegendre, riemann_left, riemann_right, riemann_middle, riemann_trapezoid), `baseline`
    ("zero": the mean colour, or "black"), `reduction` over colour channels (max_abs, sum_abs,
    sum), `normalisation` for display (min_max, percentile_99). With `raw`, a pixel
    attribution's heatmap is its unreduced 3xHxW array at the input's resolution;
    `Explanation.convergence_delta` holds IG's.
    Checked by `ExplainOptions`, whose fields are these keys with their defaults.
    """

    model: str | None
    target: Target
    top_k: int | None
    methods: Methods
    layer: str | None
    resolution: Resolution
    dtype: str
    raw: bool
    overlay: bool
    top_predictions: int
    eigen_smooth: bool
    aug_smooth: bool
    scores: Scores
    score_steps: int | None
    score_curves: bool
    feature_layers: Sequence[str]
    channels: int | Sequence[int] | None
    channel_selection: str
    feature_resolution: str
    feature_dtype: str
    feature_raw: bool
    gates: bool | Sequence[str]
    gate_resolution: str
    heatmaps: bool
    samples: int | None
    noise: float | None
    seed: int | None
    steps: int | None
    quadrature: str | None
    baseline: str | None
    reduction: str | None
    normalisation: str | None


@dataclass(frozen=True)
class ExplainOptions:
    """Everything about an explain call except its images, checked once on construction.

    Its fields are exactly the keys of `ExplainKwargs` (a test keeps the two in step).
    """

    model: str | None = None
    target: Target = None
    top_k: int | None = None
    methods: Methods = DEFAULT_METHOD
    layer: str | None = None
    resolution: Resolution = "original"
    dtype: str = "float32"
    raw: bool = False
    overlay: bool = False
    top_predictions: int = 5
    eigen_smooth: bool = False
    aug_smooth: bool = False
    scores: Scores = ()
    score_steps: int | None = None
    score_curves: bool = False
    feature_layers: Sequence[str] = ()
    channels: int | Sequence[int] | None = None
    channel_selection: str = "first"
    feature_resolution: str = "feature"
    feature_dtype: str = "float32"
    feature_raw: bool = False
    gates: bool | Sequence[str] = False
    gate_resolution: str = "feature"
    heatmaps: bool = True
    samples: int | None = None
    noise: float | None = None
    seed: int | None = None
    steps: int | None = None
    quadrature: str | None = None
    baseline: str | None = None
    reduction: str | None = None
    normalisation: str | None = None

    def __post_init__(self) -> None:
        if self.target is not None and self.top_k is not None:
            raise ValueError("pass either `target` or `top_k`, not both")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int; got {self.top_k!r}")
        if not isinstance(self.top_predictions, int) or self.top_predictions < 1:
            raise ValueError(
                f"top_predictions must be a positive int; got {self.top_predictions!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {sorted(DTYPES)}")
        # Converting now surfaces a bad method, target or resolution before any image is read.
        self.target_proto()
        self.method_protos()
        self._check_scores()
        self.output_proto()
        feature_options(self)
        gate_options(self)
        if not self.heatmaps and not (self.feature_layers or self.gates):
            raise ValueError(
                "heatmaps=False returns only feature maps and gates: ask for feature_layers or "
                "gates too"
            )
        self.pixel_proto()
        if self.aug_smooth and self.resolution == "feature":
            raise ValueError(
                "aug_smooth averages maps at the input resolution, so there is no "
                'resolution="feature" version; use "input", "original" or (height, width), or '
                "drop aug_smooth"
            )

    def score_names(self) -> tuple[str, ...]:
        """The scores asked for by their full names, once each, in the order given."""
        names = [self.scores] if isinstance(self.scores, str) else list(self.scores)
        unknown = [name for name in names if SCORE_ALIASES.get(name, name) not in SCORES]
        if unknown:
            raise ValueError(
                f"unknown scores {unknown}; use one or more of {list(SCORES)} "
                f"(or {list(SCORE_ALIASES)})"
            )
        return tuple(dict.fromkeys(SCORE_ALIASES.get(name, name) for name in names))

    def _check_scores(self) -> None:
        curves = any(name in CURVE_SCORES for name in self.score_names())
        steps = self.score_steps
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"score_steps must be a positive int; got {steps!r}")
            if not curves:
                raise ValueError(
                    "score_steps only applies to the deletion and insertion curves; add "
                    '"deletion" or "insertion" to scores, or leave score_steps out'
                )
        if self.score_curves and not curves:
            raise ValueError(
                'score_curves needs a curve score: add "deletion" or "insertion" to scores'
            )

    def target_proto(self) -> pb.Target:
        if self.top_k is not None:
            return pb.Target(top_k=self.top_k)
        target = self.target
        if target is None:
            return pb.Target()
        items = [target] if isinstance(target, (int, str)) else list(target)
        indices: list[int] = []
        labels: list[str] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise TypeError(
                    f"target entries must be class indices (int) or labels (str); got {item!r}"
                )
            if isinstance(item, int):
                if item < 0:
                    raise ValueError(f"target class index must not be negative; got {item}")
                indices.append(item)
            else:
                labels.append(item)
        if not items:
            raise ValueError("target is empty; leave it out to explain the predicted class")
        return pb.Target(class_indices=indices, class_labels=labels)

    def method_protos(self) -> list[pb.Method]:
        names = [self.methods] if isinstance(self.methods, str) else list(self.methods)
        if not names:
            raise ValueError(f"methods is empty; use one or more of {list(METHODS)}")
        unknown = [name for name in names if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; use one or more of {list(METHODS)}")
        return [METHODS[name] for name in dict.fromkeys(names)]

    def pixel_proto(self) -> pb.SaliencyOptions:
        """The pixel attributions' options; unset ones are left to the server's defaults."""
        options = pb.SaliencyOptions()
        for name in ("samples", "steps", "seed"):
            value = getattr(self, name)
            if value is None:
                continue
            least = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
            setattr(options, name, value)
        if self.noise is not None:
            if isinstance(self.noise, bool) or not float(self.noise) > 0:
                raise ValueError(f"noise must be a positive number; got {self.noise!r}")
            options.noise = float(self.noise)
        for name, table in (
            ("quadrature", QUADRATURES),
            ("baseline", BASELINES),
            ("reduction", REDUCTIONS),
            ("normalisation", NORMALISATIONS),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if value not in table:
                raise ValueError(f"{name}={value!r}: use one of {list(table)}")
            setattr(options, name, table[value])
        return options

    def output_proto(self) -> pb.OutputOptions:
        output = pb.OutputOptions(
            dtype=DTYPES[self.dtype],
            raw=self.raw,
            overlay=self.overlay,
            scores=[SCORES[name] for name in self.score_names()],
            score_steps=self.score_steps or 0,  # 0: the server's default
            score_curves=self.score_curves,
        )
        resolution = self.resolution
        if isinstance(resolution, str):
            if resolution not in RESOLUTIONS:
                raise ValueError(
                    f"resolution={resolution!r}: use one of {list(RESOLUTIONS)} or (height, width)"
                )
            output.resolution = RESOLUTIONS[resolution]
            return output
        size = tuple(resolution)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ValueError(
                f"resolution as a size must be (height, width) > 0; got {resolution!r}"
            )
        output.resolution = pb.RESOLUTION_EXPLICIT
        output.height, output.width = size
        return output


def _inspect_resolution(name: str, argument: str) -> pb.Resolution:
    if name not in INSPECT_RESOLUTIONS:
        raise ValueError(f"{argument}={name!r}: use one of {list(INSPECT_RESOLUTIONS)}")
    return INSPECT_RESOLUTIONS[name]


def feature_options(options: ExplainOptions) -> pb.FeatureMapOptions | None:
    """The feature-map options of `options`, or None when it asks for no layers."""
    layers = [options.feature_layers] if isinstance(options.feature_layers, str) else []
    layers = layers or list(options.feature_layers)
    if not layers:
        return None
    if options.feature_dtype not in DTYPES:
        raise ValueError(f"feature_dtype={options.feature_dtype!r}: use one of {sorted(DTYPES)}")
    message = pb.FeatureMapOptions(
        layers=layers,
        resolution=_inspect_resolution(options.feature_resolution, "feature_resolution"),
        dtype=DTYPES[options.feature_dtype],
        raw=options.feature_raw,
    )
    channels = options.channels
    if channels is None or isinstance(channels, int):
        if channels is not None and (isinstance(channels, bool) or channels < 1):
            raise ValueError(
                f"channels must be a positive int or channel indices; got {channels!r}"
            )
        if options.channel_selection not in SELECTIONS:
            raise ValueError(
                f"channel_selection={options.channel_selection!r}: use one of {list(SELECTIONS)}"
            )
        message.selection = SELECTIONS[options.channel_selection]
        message.channels = channels or 0
        return message
    indices = list(channels)
    if not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise ValueError(f"channels as indices must be non-negative ints; got {channels!r}")
    message.selection = pb.CHANNEL_SELECTION_INDICES
    message.channel_indices.extend(indices)
    return message


def gate_options(options: ExplainOptions) -> pb.GateOptions | None:
    """The gate options of `options`, or None when it asks for no gates."""
    gates = options.gates
    if gates is False or (not isinstance(gates, bool) and not gates):
        return None
    names = [] if gates is True else ([gates] if isinstance(gates, str) else list(gates))
    resolution = _inspect_resolution(options.gate_resolution, "gate_resolution")
    return pb.GateOptions(names=names, resolution=resolution)


def build_request(
    images: Sequence[ImageInput], options: ExplainOptions, *, request_id: str | None = None
) -> pb.ExplainRequest:
    """One ExplainRequest for `images`, each with the same target."""
    if not images:
        raise ValueError("images is empty; pass at least one image")
    target = options.target_proto()
    wire_images = []
    for image in images:
        wire = to_wire(image)
        wire.target.CopyFrom(target)
        wire_images.append(wire)
    request = pb.ExplainRequest(
        model=options.model or "",
        images=wire_images,
        layer=options.layer or "",
        methods=options.method_protos() if options.heatmaps else [],
        output=options.output_proto(),
        top_predictions=options.top_predictions if options.heatmaps else None,
        request_id=request_id or "",
        eigen_smooth=options.eigen_smooth,
        aug_smooth=options.aug_smooth,
        no_heatmaps=not options.heatmaps,
        pixel_attribution=options.pixel_proto(),
    )
    if (features := feature_options(options)) is not None:
        request.feature_maps.CopyFrom(features)
    if (gates := gate_options(options)) is not None:
        request.gates.CopyFrom(gates)
    return request
