"""Checks an ExplainRequest against a model and the limits, before anything is queued.

Every refusal is a `RequestError` whose message starts with the offending field (as a path such
as `images[2].target.class_indices[0]`) and says what is allowed, so callers can fix the request
without reading server logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from camserve.server.errors import InvalidRequest
from camserve.server.inspect_plan import InspectPlan, inspect_plan, wire_bytes
from camserve.server.pixel_options import (
    PixelOptionError,
    PixelOptions,
    check_pixel_methods,
    gradient_rows,
    pixel_options,
)
from camserve.server.records import ArrayImage, EncodedImage, ImageSource, ModelMeta
from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import DEFAULT_METHOD, METHOD_BY_NAME, NAME_BY_METHOD
from camserve.v1.scores import (
    CURVE_SCORES,
    DEFAULT_SCORE_STEPS,
    MIN_SCORE_STEPS,
    NAME_BY_SCORE,
    SCORE_BY_NAME,
)
from camserve.v1.tensors import TensorFormatError, from_proto

if TYPE_CHECKING:
    from camserve.server.engine.shaping import Geometry

DEFAULT_TOP_PREDICTIONS = 5
_RESOLUTIONS = frozenset(pb.Resolution.values())
_DTYPES = frozenset(pb.DType.values())


class RequestError(InvalidRequest):
    """A request field the server refuses; the message starts with the field's path."""


@dataclass(frozen=True)
class OutputPlan:
    """How each heatmap is shaped and encoded."""

    resolution: int  # a pb.Resolution value (UNSPECIFIED already turned into ORIGINAL)
    size: tuple[int, int] | None  # RESOLUTION_EXPLICIT only
    dtype: int  # a pb.DType value, never UNSPECIFIED
    raw: bool
    overlay: bool


@dataclass(frozen=True)
class ImageTarget:
    """What to explain in one image: explicit classes, or the top_k predicted ones."""

    classes: tuple[int, ...]
    top_k: int


@dataclass(frozen=True)
class RequestBudget:
    """What a validated request will make, counted once, here: each image's maps, and per
    explained copy of an image its rows (the explain row, then a row per channel of the layer
    for each method made by rows after the pass). Admission prices it
    (`followups.request_cost`); the response-size and shaping checks read its maps."""

    maps_per_image: tuple[int, ...]
    channels: int = 0  # of the target layer
    tail_methods: int = 0  # methods whose rows run only the modules after the layer
    model_methods: int = 0  # methods whose rows run the whole model
    # Pixel attributions: their maps per image (at the input's resolution, 3xHxW when raw),
    # whether the explain row takes the gradient at the input, and the rows with their input
    # gradient after the pass per image (SmoothGrad's copies, IG's points and baseline).
    pixel_maps_per_image: tuple[int, ...] = ()
    input_gradient: bool = False
    gradient_rows: int = 0

    @property
    def maps(self) -> int:
        return sum(self.maps_per_image)

    @property
    def rows_per_copy(self) -> int:
        return 1 + self.channels * (self.tail_methods + self.model_methods)

    @property
    def pixel_maps(self) -> int:
        return sum(self.pixel_maps_per_image)

    @property
    def rows_after_pass(self) -> bool:
        return bool(self.tail_methods or self.model_methods)


def budget_of(
    targets: Sequence[ImageTarget],
    methods: tuple[str, ...],
    layer: str,
    meta: ModelMeta,
    pixel: PixelOptions | None = None,
) -> RequestBudget:
    """The budget of explaining `targets` with `methods` at `layer` of the model."""
    offered = [meta.method_info[name] for name in methods]
    classes = [len(t.classes) or t.top_k for t in targets]
    pixel_methods = sum(m.pixel for m in offered)
    return RequestBudget(
        maps_per_image=tuple(count * len(methods) for count in classes),
        channels=meta.layer_shapes[layer][0],
        tail_methods=sum(m.channel_rows and m.through_tail for m in offered),
        model_methods=sum(m.channel_rows and not m.through_tail for m in offered),
        pixel_maps_per_image=tuple(count * pixel_methods for count in classes)
        if pixel_methods
        else (),
        input_gradient=any(m.input_gradient for m in offered),
        gradient_rows=gradient_rows(methods, meta, pixel or PixelOptions()),
    )


@dataclass(frozen=True)
class ExplainPlan:
    """A validated request, ready for decoding and batching."""

    layer: str
    methods: tuple[str, ...]
    output: OutputPlan
    top_predictions: int
    targets: tuple[ImageTarget, ...]
    eigen_smooth: bool = False
    aug_smooth: bool = False
    # Faithfulness scores per heatmap, by engine name (confidence_change, deletion_auc,
    # insertion_auc), the steps of the deletion/insertion curves, and whether to return them.
    scores: tuple[str, ...] = ()
    score_steps: int = DEFAULT_SCORE_STEPS
    score_curves: bool = False
    pixel: PixelOptions = PixelOptions()  # the pixel attributions' options
    budget: RequestBudget = RequestBudget(())  # set by `validate`
    inspect: InspectPlan = InspectPlan()  # feature maps and gate values (`inspect_plan`)


def _choices(values: object) -> str:
    return ", ".join(str(v) for v in values)  # type: ignore[attr-defined]


def _distinct(
    values: Sequence[int],
    field: str,
    what: str,
    name_by_value: Mapping[int, str],
    offered: Mapping[str, int],
    enum_name: Callable[[int], str],
) -> tuple[str, ...]:
    """The names of enum `values`, each once in first-seen order; an unknown value is refused
    naming its field and listing the values offered."""
    names: list[str] = []
    for i, value in enumerate(values):
        if value not in name_by_value:
            raise RequestError(
                f"{field}[{i}]: unknown {what} {value}; use one of "
                f"{_choices(f'{enum_name(v)}={v}' for v in offered.values())}"
            )
        if name_by_value[value] not in names:
            names.append(name_by_value[value])
    return tuple(names)


def _methods(request: pb.ExplainRequest, meta: ModelMeta) -> tuple[str, ...]:
    methods = _distinct(
        request.methods, "methods", "method", NAME_BY_METHOD, METHOD_BY_NAME, pb.Method.Name
    )
    for name in methods:
        if name in meta.refused:
            raise RequestError(f"methods: {meta.refused[name]}")
        if name not in meta.method_info:
            raise RequestError(
                f"methods: model {meta.name!r} does not offer {name}; it offers "
                f"{', '.join(meta.method_info)} (listed by GetModel)"
            )
    return methods or (DEFAULT_METHOD,)


def _check_layer_fits(methods: tuple[str, ...], layer: str, meta: ModelMeta) -> None:
    """Refuses a method that cannot explain the layer's layout, naming layers it can."""
    layout = next(spec.layout for spec in meta.layers if spec.name == layer)
    for name in methods:
        accepted = meta.method_info[name].layouts
        if layout in accepted:
            continue
        fitting = meta.layers_for(name)
        shown = ", ".join(fitting[-8:]) if fitting else "none in this model"
        raise RequestError(
            f"methods: {name} cannot explain layer {layer!r} of model {meta.name!r}, whose "
            f"output is laid out {layout}; it takes {'/'.join(sorted(accepted))} layers. Choose "
            f"another method, or a layer it works at: {shown}"
            + (f" ({len(fitting)} in all, listed by GetModel)" if len(fitting) > 8 else "")
        )


def _output(options: pb.OutputOptions, limits: LimitsSettings) -> OutputPlan:
    if options.resolution not in _RESOLUTIONS:
        raise RequestError(
            f"output.resolution: unknown value {options.resolution}; use one of "
            f"{_choices(f'{pb.Resolution.Name(v)}={v}' for v in sorted(_RESOLUTIONS))}"
        )
    if options.dtype not in _DTYPES:
        raise RequestError(
            f"output.dtype: unknown value {options.dtype}; use DTYPE_FLOAT32, DTYPE_FLOAT16 "
            "or DTYPE_UINT8"
        )
    resolution = options.resolution or pb.RESOLUTION_ORIGINAL
    size = None
    if resolution == pb.RESOLUTION_EXPLICIT:
        height, width = options.height, options.width
        if height < 1 or width < 1:
            raise RequestError(
                f"output.height/width: RESOLUTION_EXPLICIT needs both >= 1, got {height}x{width}"
            )
        if height * width > limits.max_output_pixels:
            raise RequestError(
                f"output.height/width: {height}x{width} is over the limit of "
                f"{limits.max_output_pixels} pixels per heatmap"
            )
        size = (int(height), int(width))
    elif options.height or options.width:
        raise RequestError("output.height/width: only used with RESOLUTION_EXPLICIT; leave them 0")
    dtype = options.dtype or pb.DTYPE_FLOAT32
    if options.raw and dtype == pb.DTYPE_UINT8:
        raise RequestError("output.dtype: DTYPE_UINT8 needs normalised maps; unset output.raw")
    return OutputPlan(resolution, size, dtype, options.raw, options.overlay)


@dataclass(frozen=True)
class ScoreOptions:
    """The faithfulness scores a request asks for, checked: engine names, steps, curves."""

    names: tuple[str, ...]
    steps: int
    curves: bool


def _score_names(options: pb.OutputOptions) -> tuple[str, ...]:
    return _distinct(
        options.scores, "output.scores", "score", NAME_BY_SCORE, SCORE_BY_NAME, pb.Score.Name
    )


def _score_steps(
    options: pb.OutputOptions, curves: bool, meta: ModelMeta, limits: LimitsSettings
) -> int:
    """The curves' steps: 0 is the default; otherwise bounded so that a scored map's cost (a
    forward row per step and curve) stays predictable, and never above the input's pixels."""
    steps = options.score_steps
    if not steps:
        return DEFAULT_SCORE_STEPS
    if not curves:
        raise RequestError(
            "output.score_steps: steps only apply to the deletion and insertion curves; add "
            "SCORE_DELETION_AUC or SCORE_INSERTION_AUC to output.scores, or leave it 0"
        )
    highest = min(limits.max_score_steps, meta.recipe.crop * meta.recipe.crop)
    if not MIN_SCORE_STEPS <= steps <= highest:
        raise RequestError(
            f"output.score_steps: {steps} is outside {MIN_SCORE_STEPS}..{highest} (this "
            f"server's limit for model {meta.name!r}); each step costs a forward row per map "
            f"and curve: use fewer, or 0 for the default {DEFAULT_SCORE_STEPS}"
        )
    return int(steps)


def _scores(options: pb.OutputOptions, meta: ModelMeta, limits: LimitsSettings) -> ScoreOptions:
    names = _score_names(options)
    curves = any(name in CURVE_SCORES for name in names)
    if options.score_curves and not curves:
        raise RequestError(
            "output.score_curves: curves come with the deletion and insertion scores; add "
            "SCORE_DELETION_AUC or SCORE_INSERTION_AUC to output.scores, or unset score_curves"
        )
    return ScoreOptions(names, _score_steps(options, curves, meta, limits), options.score_curves)


def _check_smoothing(request: pb.ExplainRequest) -> None:
    if request.aug_smooth and request.output.resolution == pb.RESOLUTION_FEATURE_MAP:
        raise RequestError(
            "aug_smooth: cannot be combined with output.resolution RESOLUTION_FEATURE_MAP; "
            "aug_smooth maps are averaged at input resolution, so there is no feature-map "
            "version: use RESOLUTION_INPUT, RESOLUTION_ORIGINAL or RESOLUTION_EXPLICIT, or "
            "unset aug_smooth"
        )


def _target(target: pb.Target, field: str, meta: ModelMeta, limits: LimitsSettings) -> ImageTarget:
    classes: list[int] = []
    for j, index in enumerate(target.class_indices):
        if not 0 <= index < meta.num_classes:
            raise RequestError(
                f"{field}.class_indices[{j}]: {index} is out of range; model {meta.name!r} has "
                f"classes 0..{meta.num_classes - 1}"
            )
        classes.append(index)
    label_index = meta.label_index
    for j, label in enumerate(target.class_labels):
        if label not in label_index:
            raise RequestError(
                f"{field}.class_labels[{j}]: {label!r} is not a label of model {meta.name!r}; "
                "labels are listed by GetModel"
            )
        classes.append(label_index[label])
    classes = list(dict.fromkeys(classes))
    if len(classes) > limits.max_top_k:
        raise RequestError(
            f"{field}: at most {limits.max_top_k} classes per image, got {len(classes)}"
        )
    if target.HasField("top_k"):
        if classes:
            raise RequestError(f"{field}.top_k: give either explicit classes or top_k, not both")
        highest = min(limits.max_top_k, meta.num_classes)
        if not 1 <= target.top_k <= highest:
            raise RequestError(f"{field}.top_k: {target.top_k} is outside 1..{highest}")
        return ImageTarget((), int(target.top_k))
    return ImageTarget(tuple(classes), 1)


_DTYPE_BYTES: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_UINT8: 1}
RESPONSE_OVERHEAD = 64 * 1024  # predictions, labels, framing: generous


def _heatmap_pixels(
    plan: ExplainPlan, geometry: Geometry, meta: ModelMeta, pixel: bool = False
) -> int:
    """One heatmap's pixels; a pixel attribution's is at the input's resolution at the feature
    map's, and raw it is the 3xHxW attribution at the input's resolution."""
    output = plan.output
    if pixel and output.raw:
        return 3 * meta.recipe.crop * meta.recipe.crop
    if pixel and output.resolution == pb.RESOLUTION_FEATURE_MAP:
        return meta.recipe.crop * meta.recipe.crop
    if output.resolution == pb.RESOLUTION_EXPLICIT and output.size is not None:
        return output.size[0] * output.size[1]
    if output.resolution == pb.RESOLUTION_INPUT:
        return meta.recipe.crop * meta.recipe.crop
    if output.resolution == pb.RESOLUTION_FEATURE_MAP:
        _, height, width = meta.layer_shapes[plan.layer]
        return height * width
    return geometry.original_hw[0] * geometry.original_hw[1]


def _score_bytes(plan: ExplainPlan) -> int:
    """One heatmap's scores on the wire: a tagged double per score and, with curves, S + 1
    packed floats per curve (with their tag and length)."""
    total = 9 * len(plan.scores)
    if plan.score_curves:
        curves = sum(name in CURVE_SCORES for name in plan.scores)
        total += curves * (4 * (plan.score_steps + 1) + 3)
    return total


def check_response_size(
    plan: ExplainPlan, geometries: Sequence[Geometry], meta: ModelMeta, max_bytes: int
) -> None:
    """Refuses, before any compute, a request whose answer could not be sent back."""
    itemsize = _DTYPE_BYTES[plan.output.dtype]
    per_map_extra = _score_bytes(plan)
    total = RESPONSE_OVERHEAD
    pixel_maps = plan.budget.pixel_maps_per_image or (0,) * len(geometries)
    for maps, pixel, geometry in zip(
        plan.budget.maps_per_image, pixel_maps, geometries, strict=True
    ):
        total += (maps - pixel) * (_heatmap_pixels(plan, geometry, meta) * itemsize)
        total += pixel * (_heatmap_pixels(plan, geometry, meta, pixel=True) * itemsize)
        total += maps * per_map_extra
        total += wire_bytes(plan.inspect, geometry, meta)
        if plan.output.overlay:
            total += geometry.original_hw[0] * geometry.original_hw[1] * 3  # PNG, worst case
    if total > max_bytes:
        curves = ", fewer score steps or no score curves" if plan.score_curves else ""
        raise RequestError(
            f"output: the response would be about {total / 2**20:.1f} MiB, over the server's "
            f"message limit of {max_bytes / 2**20:.0f} MiB; ask for fewer images, classes or "
            f"methods per request, a smaller resolution{curves}, or dtype float16/uint8"
            + (", or fewer feature-map layers or channels" if plan.inspect.features else "")
        )


def _layer(request: pb.ExplainRequest, meta: ModelMeta) -> str:
    layer = request.layer or meta.default_layer
    if layer not in meta.layer_names:
        names = [spec.name for spec in meta.layers]
        shown = ", ".join(names[-12:])
        raise RequestError(
            f"layer: {request.layer!r} is not a target layer of model {meta.name!r}; the last "
            f"ones are {shown} ({len(names)} in all, listed by GetModel)"
        )
    return layer


def _top_predictions(request: pb.ExplainRequest, meta: ModelMeta) -> int:
    if not request.HasField("top_predictions"):
        return min(DEFAULT_TOP_PREDICTIONS, meta.num_classes)
    if not 1 <= request.top_predictions <= meta.num_classes:
        raise RequestError(
            f"top_predictions: {request.top_predictions} is outside 1..{meta.num_classes}"
        )
    return int(request.top_predictions)


def validate(request: pb.ExplainRequest, meta: ModelMeta, limits: LimitsSettings) -> ExplainPlan:
    """The request as a plan, or RequestError naming the first bad field."""
    count = len(request.images)
    if count == 0:
        raise RequestError("images: the request has no images; send at least one")
    if count > limits.max_images_per_request:
        raise RequestError(
            f"images: {count} images is over the limit of {limits.max_images_per_request} per "
            "request; split it, or use ExplainStream"
        )
    layer = _layer(request, meta)
    top_predictions = _top_predictions(request, meta)
    targets = tuple(
        _target(image.target, f"images[{i}].target", meta, limits)
        for i, image in enumerate(request.images)
    )
    for i, image in enumerate(request.images):
        if image.WhichOneof("source") is None:
            raise RequestError(f"images[{i}]: set `encoded` (file bytes) or `tensor`")
    inspect = inspect_plan(request, meta, limits)
    methods = _methods(request, meta) if inspect.heatmaps else ()
    _check_layer_fits(methods, layer, meta)
    output = _output(request.output, limits)
    scores = _scores(request.output, meta, limits)
    _check_smoothing(request)
    try:
        check_pixel_methods(methods, meta, request.aug_smooth)
        pixel = pixel_options(request.pixel_attribution, limits)
    except PixelOptionError as exc:
        raise RequestError(str(exc)) from None
    return ExplainPlan(
        layer=layer,
        methods=methods,
        output=output,
        top_predictions=int(top_predictions),
        targets=targets,
        eigen_smooth=request.eigen_smooth,
        aug_smooth=request.aug_smooth,
        scores=scores.names,
        score_steps=scores.steps,
        score_curves=scores.curves,
        pixel=pixel,
        budget=budget_of(targets, methods, layer, meta, pixel),
        inspect=inspect,
    )


def image_sources(request: pb.ExplainRequest) -> tuple[ImageSource, ...]:
    """Each image's bytes or array, unpacked from the wire and named by its request field."""
    sources: list[ImageSource] = []
    for i, image in enumerate(request.images):
        field = f"images[{i}]"
        if image.WhichOneof("source") == "encoded":
            sources.append(EncodedImage(image.encoded, f"{field}.encoded"))
            continue
        field = f"{field}.tensor"
        try:
            array = from_proto(image.tensor, field)
        except TensorFormatError as exc:
            raise RequestError(str(exc)) from None
        if image.tensor.dtype == pb.DTYPE_UINT8:
            sources.append(ArrayImage(array, field, normalised=False))
        elif image.tensor.dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
            sources.append(ArrayImage(array, field, normalised=True))
        else:
            raise RequestError(
                f"{field}.dtype: images travel as uint8 HxWx3 or float32 3xHxW, not "
                f"{pb.DType.Name(image.tensor.dtype)}"
            )
    return tuple(sources)
