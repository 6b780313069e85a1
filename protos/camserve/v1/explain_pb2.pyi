from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_GRADCAM: _ClassVar[Method]
    METHOD_GRADCAMPP: _ClassVar[Method]
    METHOD_XGRADCAM: _ClassVar[Method]
    METHOD_HIRESCAM: _ClassVar[Method]
    METHOD_LAYERCAM: _ClassVar[Method]
    METHOD_GRADCAM_ELEMENTWISE: _ClassVar[Method]
    METHOD_EIGENCAM: _ClassVar[Method]
    METHOD_EIGENGRADCAM: _ClassVar[Method]
    METHOD_ABLATIONCAM: _ClassVar[Method]
    METHOD_SCORECAM: _ClassVar[Method]
    METHOD_SALIENCY: _ClassVar[Method]
    METHOD_INPUT_X_GRADIENT: _ClassVar[Method]
    METHOD_SMOOTHGRAD: _ClassVar[Method]
    METHOD_INTEGRATED_GRADIENTS: _ClassVar[Method]
    METHOD_GUIDED_BACKPROP: _ClassVar[Method]
    METHOD_GUIDED_GRADCAM: _ClassVar[Method]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_MAX_ABS: _ClassVar[Reduction]
    REDUCTION_SUM_ABS: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]

class Normalisation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALISATION_UNSPECIFIED: _ClassVar[Normalisation]
    NORMALISATION_MIN_MAX: _ClassVar[Normalisation]
    NORMALISATION_PERCENTILE_99: _ClassVar[Normalisation]

class Quadrature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUADRATURE_UNSPECIFIED: _ClassVar[Quadrature]
    QUADRATURE_GAUSS_LEGENDRE: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_LEFT: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_RIGHT: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_MIDDLE: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_TRAPEZOID: _ClassVar[Quadrature]

class Baseline(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASELINE_UNSPECIFIED: _ClassVar[Baseline]
    BASELINE_ZERO: _ClassVar[Baseline]
    BASELINE_BLACK: _ClassVar[Baseline]

class Score(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_UNSPECIFIED: _ClassVar[Score]
    SCORE_CONFIDENCE_CHANGE: _ClassVar[Score]
    SCORE_DELETION_AUC: _ClassVar[Score]
    SCORE_INSERTION_AUC: _ClassVar[Score]

class Resolution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOLUTION_UNSPECIFIED: _ClassVar[Resolution]
    RESOLUTION_FEATURE_MAP: _ClassVar[Resolution]
    RESOLUTION_INPUT: _ClassVar[Resolution]
    RESOLUTION_ORIGINAL: _ClassVar[Resolution]
    RESOLUTION_EXPLICIT: _ClassVar[Resolution]

class ChannelSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_SELECTION_UNSPECIFIED: _ClassVar[ChannelSelection]
    CHANNEL_SELECTION_FIRST: _ClassVar[ChannelSelection]
    CHANNEL_SELECTION_TOP_MEAN: _ClassVar[ChannelSelection]
    CHANNEL_SELECTION_TOP_GRADCAM: _ClassVar[ChannelSelection]
    CHANNEL_SELECTION_INDICES: _ClassVar[ChannelSelection]

class GateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_KIND_UNSPECIFIED: _ClassVar[GateKind]
    GATE_KIND_CHANNEL: _ClassVar[GateKind]
    GATE_KIND_SPATIAL: _ClassVar[GateKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_UINT8: DType
METHOD_UNSPECIFIED: Method
METHOD_GRADCAM: Method
METHOD_GRADCAMPP: Method
METHOD_XGRADCAM: Method
METHOD_HIRESCAM: Method
METHOD_LAYERCAM: Method
METHOD_GRADCAM_ELEMENTWISE: Method
METHOD_EIGENCAM: Method
METHOD_EIGENGRADCAM: Method
METHOD_ABLATIONCAM: Method
METHOD_SCORECAM: Method
METHOD_SALIENCY: Method
METHOD_INPUT_X_GRADIENT: Method
METHOD_SMOOTHGRAD: Method
METHOD_INTEGRATED_GRADIENTS: Method
METHOD_GUIDED_BACKPROP: Method
METHOD_GUIDED_GRADCAM: Method
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_MAX_ABS: Reduction
REDUCTION_SUM_ABS: Reduction
REDUCTION_SUM: Reduction
NORMALISATION_UNSPECIFIED: Normalisation
NORMALISATION_MIN_MAX: Normalisation
NORMALISATION_PERCENTILE_99: Normalisation
QUADRATURE_UNSPECIFIED: Quadrature
QUADRATURE_GAUSS_LEGENDRE: Quadrature
QUADRATURE_RIEMANN_LEFT: Quadrature
QUADRATURE_RIEMANN_RIGHT: Quadrature
QUADRATURE_RIEMANN_MIDDLE: Quadrature
QUADRATURE_RIEMANN_TRAPEZOID: Quadrature
BASELINE_UNSPECIFIED: Baseline
BASELINE_ZERO: Baseline
BASELINE_BLACK: Baseline
SCORE_UNSPECIFIED: Score
SCORE_CONFIDENCE_CHANGE: Score
SCORE_DELETION_AUC: Score
SCORE_INSERTION_AUC: Score
RESOLUTION_UNSPECIFIED: Resolution
RESOLUTION_FEATURE_MAP: Resolution
RESOLUTION_INPUT: Resolution
RESOLUTION_ORIGINAL: Resolution
RESOLUTION_EXPLICIT: Resolution
CHANNEL_SELECTION_UNSPECIFIED: ChannelSelection
CHANNEL_SELECTION_FIRST: ChannelSelection
CHANNEL_SELECTION_TOP_MEAN: ChannelSelection
CHANNEL_SELECTION_TOP_GRADCAM: ChannelSelection
CHANNEL_SELECTION_INDICES: ChannelSelection
GATE_KIND_UNSPECIFIED: GateKind
GATE_KIND_CHANNEL: GateKind
GATE_KIND_SPATIAL: GateKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SaliencyOptions(_message.Message):
    __slots__ = ("samples", "noise", "seed", "steps", "quadrature", "baseline", "reduction", "normalisation")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    QUADRATURE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    NORMALISATION_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise: float
    seed: int
    steps: int
    quadrature: Quadrature
    baseline: Baseline
    reduction: Reduction
    normalisation: Normalisation
    def __init__(self, samples: _Optional[int] = ..., noise: _Optional[float] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., quadrature: _Optional[_Union[Quadrature, str]] = ..., baseline: _Optional[_Union[Baseline, str]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., normalisation: _Optional[_Union[Normalisation, str]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("class_indices", "class_labels", "top_k")
    CLASS_INDICES_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    class_indices: _containers.RepeatedScalarFieldContainer[int]
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, class_indices: _Optional[_Iterable[int]] = ..., class_labels: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor", "target")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    target: Target
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Target, _Mapping]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("resolution", "height", "width", "dtype", "raw", "overlay", "scores", "score_steps", "score_curves")
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SCORE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCORE_CURVES_FIELD_NUMBER: _ClassVar[int]
    resolution: Resolution
    height: int
    width: int
    dtype: DType
    raw: bool
    overlay: bool
    scores: _containers.RepeatedScalarFieldContainer[Score]
    score_steps: int
    score_curves: bool
    def __init__(self, resolution: _Optional[_Union[Resolution, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., raw: _Optional[bool] = ..., overlay: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[Score, str]]] = ..., score_steps: _Optional[int] = ..., score_curves: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "images", "layer", "methods", "output", "top_predictions", "request_id", "eigen_smooth", "aug_smooth", "feature_maps", "gates", "no_heatmaps", "pixel_attribution")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EIGEN_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    AUG_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    NO_HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    layer: str
    methods: _containers.RepeatedScalarFieldContainer[Method]
    output: OutputOptions
    top_predictions: int
    request_id: str
    eigen_smooth: bool
    aug_smooth: bool
    feature_maps: FeatureMapOptions
    gates: GateOptions
    no_heatmaps: bool
    pixel_attribution: SaliencyOptions
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., layer: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., top_predictions: _Optional[int] = ..., request_id: _Optional[str] = ..., eigen_smooth: _Optional[bool] = ..., aug_smooth: _Optional[bool] = ..., feature_maps: _Optional[_Union[FeatureMapOptions, _Mapping]] = ..., gates: _Optional[_Union[GateOptions, _Mapping]] = ..., no_heatmaps: _Optional[bool] = ..., pixel_attribution: _Optional[_Union[SaliencyOptions, _Mapping]] = ...) -> None: ...

class FeatureMapOptions(_message.Message):
    __slots__ = ("layers", "selection", "channels", "channel_indices", "resolution", "dtype", "raw")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_INDICES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    selection: ChannelSelection
    channels: int
    channel_indices: _containers.RepeatedScalarFieldContainer[int]
    resolution: Resolution
    dtype: DType
    raw: bool
    def __init__(self, layers: _Optional[_Iterable[str]] = ..., selection: _Optional[_Union[ChannelSelection, str]] = ..., channels: _Optional[int] = ..., channel_indices: _Optional[_Iterable[int]] = ..., resolution: _Optional[_Union[Resolution, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., raw: _Optional[bool] = ...) -> None: ...

class GateOptions(_message.Message):
    __slots__ = ("names", "resolution")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    resolution: Resolution
    def __init__(self, names: _Optional[_Iterable[str]] = ..., resolution: _Optional[_Union[Resolution, str]] = ...) -> None: ...

class FeatureMap(_message.Message):
    __slots__ = ("layer", "data", "channels", "channel_means", "channel_maxes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MEANS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MAXES_FIELD_NUMBER: _ClassVar[int]
    layer: str
    data: Tensor
    channels: _containers.RepeatedScalarFieldContainer[int]
    channel_means: _containers.RepeatedScalarFieldContainer[float]
    channel_maxes: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., channels: _Optional[_Iterable[int]] = ..., channel_means: _Optional[_Iterable[float]] = ..., channel_maxes: _Optional[_Iterable[float]] = ...) -> None: ...

class GateValues(_message.Message):
    __slots__ = ("name", "kind", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: GateKind
    data: Tensor
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[GateKind, str]] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("method", "class_index", "class_label", "layer", "data", "confidence_change", "deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve", "convergence_delta")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    DELETION_AUC_FIELD_NUMBER: _ClassVar[int]
    INSERTION_AUC_FIELD_NUMBER: _ClassVar[int]
    DELETION_CURVE_FIELD_NUMBER: _ClassVar[int]
    INSERTION_CURVE_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_DELTA_FIELD_NUMBER: _ClassVar[int]
    method: Method
    class_index: int
    class_label: str
    layer: str
    data: Tensor
    confidence_change: float
    deletion_auc: float
    insertion_auc: float
    deletion_curve: _containers.RepeatedScalarFieldContainer[float]
    insertion_curve: _containers.RepeatedScalarFieldContainer[float]
    convergence_delta: float
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., class_index: _Optional[int] = ..., class_label: _Optional[str] = ..., layer: _Optional[str] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., confidence_change: _Optional[float] = ..., deletion_auc: _Optional[float] = ..., insertion_auc: _Optional[float] = ..., deletion_curve: _Optional[_Iterable[float]] = ..., insertion_curve: _Optional[_Iterable[float]] = ..., convergence_delta: _Optional[float] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("predictions", "heatmaps", "overlay_png", "feature_maps", "gates")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    heatmaps: _containers.RepeatedCompositeFieldContainer[Heatmap]
    overlay_png: bytes
    feature_maps: _containers.RepeatedCompositeFieldContainer[FeatureMap]
    gates: _containers.RepeatedCompositeFieldContainer[GateValues]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., heatmaps: _Optional[_Iterable[_Union[Heatmap, _Mapping]]] = ..., overlay_png: _Optional[bytes] = ..., feature_maps: _Optional[_Iterable[_Union[FeatureMap, _Mapping]]] = ..., gates: _Optional[_Iterable[_Union[GateValues, _Mapping]]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "preprocess_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    preprocess_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    retry_after_s: float
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "results", "timing", "batch_size", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    timing: Timing
    batch_size: int
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., batch_size: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("height", "width", "resize", "center_crop", "mean", "std")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CENTER_CROP_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    resize: int
    center_crop: bool
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., resize: _Optional[int] = ..., center_crop: _Optional[bool] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "output_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "device", "ready", "input", "num_classes", "labels", "default_layer", "layers", "methods", "max_batch_size", "method_costs", "conv_layers", "gates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHOD_COSTS_FIELD_NUMBER: _ClassVar[int]
    CONV_LAYERS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    device: str
    ready: bool
    input: InputSpec
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    default_layer: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    methods: _containers.RepeatedScalarFieldContainer[Method]
    max_batch_size: int
    method_costs: _containers.RepeatedCompositeFieldContainer[MethodCost]
    conv_layers: _containers.RepeatedCompositeFieldContainer[ConvLayerInfo]
    gates: _containers.RepeatedCompositeFieldContainer[GateInfo]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., ready: _Optional[bool] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., default_layer: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., max_batch_size: _Optional[int] = ..., method_costs: _Optional[_Iterable[_Union[MethodCost, _Mapping]]] = ..., conv_layers: _Optional[_Iterable[_Union[ConvLayerInfo, _Mapping]]] = ..., gates: _Optional[_Iterable[_Union[GateInfo, _Mapping]]] = ...) -> None: ...

class GateInfo(_message.Message):
    __slots__ = ("name", "kind", "shape", "module")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: GateKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    module: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[GateKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., module: _Optional[str] = ...) -> None: ...

class ConvLayerInfo(_message.Message):
    __slots__ = ("name", "weight_shape", "groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight_shape: _containers.RepeatedScalarFieldContainer[int]
    groups: int
    def __init__(self, name: _Optional[str] = ..., weight_shape: _Optional[_Iterable[int]] = ..., groups: _Optional[int] = ...) -> None: ...

class GetKernelsRequest(_message.Message):
    __slots__ = ("model", "layer", "skip_weights", "skip_grid", "page", "tiles_per_page", "tile_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SKIP_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SKIP_GRID_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    TILES_PER_PAGE_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: str
    skip_weights: bool
    skip_grid: bool
    page: int
    tiles_per_page: int
    tile_size: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[str] = ..., skip_weights: _Optional[bool] = ..., skip_grid: _Optional[bool] = ..., page: _Optional[int] = ..., tiles_per_page: _Optional[int] = ..., tile_size: _Optional[int] = ...) -> None: ...

class GetKernelsResponse(_message.Message):
    __slots__ = ("model", "model_version", "layer", "weights", "grid_png", "colour", "page", "pages", "first_filter", "end_filter", "columns", "rows", "tiles")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    COLOUR_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FILTER_FIELD_NUMBER: _ClassVar[int]
    END_FILTER_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    layer: str
    weights: Tensor
    grid_png: bytes
    colour: bool
    page: int
    pages: int
    first_filter: int
    end_filter: int
    columns: int
    rows: int
    tiles: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., layer: _Optional[str] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., grid_png: _Optional[bytes] = ..., colour: _Optional[bool] = ..., page: _Optional[int] = ..., pages: _Optional[int] = ..., first_filter: _Optional[int] = ..., end_filter: _Optional[int] = ..., columns: _Optional[int] = ..., rows: _Optional[int] = ..., tiles: _Optional[int] = ...) -> None: ...

class MethodCost(_message.Message):
    __slots__ = ("method", "rows_per_image", "forward_passes")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    method: Method
    rows_per_image: int
    forward_passes: float
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., rows_per_image: _Optional[int] = ..., forward_passes: _Optional[float] = ...) -> None: ...
