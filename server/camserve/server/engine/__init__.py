"""The CAM engine: Grad-CAM and its relatives for whole batches.

Every method is one entry of `registry` (`REGISTRY`, by name `BY_NAME`): its wire value, what
the explain pass must produce for it, the layer layouts it accepts, its cost, and the work it
needs after the pass. `CamEngine.explain_batch` runs the model once forward and once backward
and returns raw maps at feature resolution for the methods made by that pass (`PASS_METHODS`:
Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, Grad-CAM element-wise, EigenCAM,
EigenGradCAM), with `eigen_smooth` and `aug_smooth` options per row; `shaping` turns maps into
pixels over the model input or the original image, and into [0, 1] (`shape_heatmaps`, one
normalisation rule at every resolution). The methods made by forward-only rows after that pass
(`ROW_METHODS`: AblationCAM, ScoreCAM) are run by `gradient_free`. `costs` says what each method
weighs.

Pixel attributions (`saliency`, `input_x_gradient`, `guided_backprop`, `guided_gradcam`: made by
the same pass, which then also differentiates its input, `input_pass`; `smoothgrad` and
`integrated_gradients`: rows with their input gradient after it, `gradient_rows`) give maps at
the input's resolution (`saliency` has their arithmetic). The guided ones apply only to models
whose nonlinearities are all ReLU or ReLU6 (`activations`, `CamEngine.nonlinearities`).

Target layers (`CamEngine.layers`) are the modules that run exactly once per forward pass and
output one map per image: an NCHW or NHWC feature map, or a vision transformer's token sequence
(N, P + h * w, C) whose P prefix tokens (class, distillation, register) are dropped and whose
patch grid is restored (`camserve.server.engine.layouts`; `LayoutHints` overrides the detection).
A module the model calls several times (torchvision BasicBlock's `relu`) is refused by
`explain_batch` with a `LayerError` that says how many times it runs and names the enclosing
block instead; so are modules returning tuples or non-spatial tensors, sequences without a patch
grid, and layers whose positions receive no gradient (a ViT's last block, after which only the
class token counts).

Default layer (`CamEngine.default_layer`): one probe pass at the given input size, with hooks on
every submodule in forward-completion order. For CNNs the default is the last module whose output
is a map with H * W > 1, that runs exactly once, and after which only non-spatial processing
follows (torchvision ResNet: `layer4`; MobileNet: `features`; VGG: `avgpool`, its 7x7 adaptive
pool). When the last spatial output comes from a shared module there is no default and a
`LayerError` asks for an explicit layer. For transformers it is the last layer whose positions
receive gradient (a class-token ViT: its last block's first norm). Details in
`camserve.server.engine.layers`.

Faithfulness scores of the maps (`confidence_change`, `deletion_auc`, `insertion_auc`) are
forward-only rows planned by `ScorePlan`; definitions in `camserve.server.engine.faithfulness`.
"""

from camserve.server.engine.core import PRECISIONS, CamEngine
from camserve.server.engine.costs import MethodCost, method_cost
from camserve.server.engine.faithfulness import DEFAULT_STEPS, MAX_STEPS, SCORES
from camserve.server.engine.gradient_free import ChannelPlan, FollowUp, explain_all
from camserve.server.engine.jobs import FollowUpPlan, ForwardJob, run_forward, run_plan
from camserve.server.engine.layouts import LayoutHints
from camserve.server.engine.registry import (
    BY_NAME,
    NAMES,
    PASS_METHODS,
    REGISTRY,
    ROW_METHODS,
    Method,
    Produces,
)
from camserve.server.engine.scoring import (
    Curve,
    MapScores,
    ScorePlan,
    forward_rows,
    plan_from_results,
    run_scores,
)
from camserve.server.engine.shaping import (
    Geometry,
    normalise,
    output_bytes,
    shape_heatmaps,
    to_input,
    to_original,
    to_size,
)
from camserve.server.engine.types import (
    Augmentation,
    EngineError,
    LayerError,
    LayerSpec,
    ModelFault,
    Retained,
    RowRequest,
    RowResult,
)

__all__ = [
    "BY_NAME",
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "NAMES",
    "PASS_METHODS",
    "PRECISIONS",
    "REGISTRY",
    "ROW_METHODS",
    "SCORES",
    "Augmentation",
    "CamEngine",
    "ChannelPlan",
    "Curve",
    "EngineError",
    "FollowUp",
    "Geometry",
    "LayerError",
    "LayerSpec",
    "LayoutHints",
    "MapScores",
    "Method",
    "MethodCost",
    "ModelFault",
    "FollowUpPlan",
    "ForwardJob",
    "Produces",
    "Retained",
    "RowRequest",
    "RowResult",
    "ScorePlan",
    "explain_all",
    "run_forward",
    "run_plan",
    "forward_rows",
    "method_cost",
    "normalise",
    "output_bytes",
    "plan_from_results",
    "run_scores",
    "shape_heatmaps",
    "to_input",
    "to_original",
    "to_size",
]
