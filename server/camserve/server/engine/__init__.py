"""The CAM engine: Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM for whole batches.

`CamEngine` runs the model and returns raw maps at feature resolution; `shaping` turns them into
pixels over the model input or the original image, and into [0, 1].

Target layers (`CamEngine.layers`) are the modules that run exactly once per forward pass and
output a 4-D (N, C, H, W) tensor. A module the model calls several times (torchvision
BasicBlock's `relu`) is refused by `explain` with a `LayerError` that says how many times it runs
and names the enclosing block instead; so are modules returning tuples or non-spatial tensors.

Default layer (`CamEngine.default_layer`): one probe forward pass at the given input size, with
hooks on every submodule in forward-completion order; the default is the last module whose output
is 4-D with H * W > 1, that runs exactly once, and after which only non-spatial processing
follows (torchvision ResNet: `layer4`; MobileNet: `features`; VGG: `avgpool`, its 7x7 adaptive
pool). When the last spatial output comes from a shared module there is no default and a
`LayerError` asks for an explicit layer. Details in `camserve.server.engine.layers`.

Faithfulness scores of the maps (`confidence_change`, `deletion_auc`, `insertion_auc`) are
forward-only rows planned by `ScorePlan`; definitions in `camserve.server.engine.faithfulness`.
"""

from camserve.server.engine.core import PRECISIONS, CamEngine
from camserve.server.engine.faithfulness import DEFAULT_STEPS, MAX_STEPS, SCORES
from camserve.server.engine.scoring import (
    Curve,
    MapScores,
    ScorePlan,
    forward_rows,
    plan_from_results,
    run_scores,
)
from camserve.server.engine.shaping import Geometry, normalise, to_input, to_original, to_size
from camserve.server.engine.types import (
    METHODS,
    EngineError,
    LayerError,
    LayerSpec,
    RowRequest,
    RowResult,
)

__all__ = [
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "METHODS",
    "PRECISIONS",
    "SCORES",
    "CamEngine",
    "Curve",
    "EngineError",
    "Geometry",
    "LayerError",
    "LayerSpec",
    "MapScores",
    "RowRequest",
    "RowResult",
    "ScorePlan",
    "forward_rows",
    "normalise",
    "plan_from_results",
    "run_scores",
    "to_input",
    "to_original",
    "to_size",
]
