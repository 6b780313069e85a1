"""The CAM engine: Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM for whole batches.

`CamEngine` runs the model and returns raw maps at feature resolution; `shaping` turns them into
pixels over the model input or the original image, and into [0, 1] (`shape_heatmaps`, with one
normalisation rule at every resolution).

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
"""

from camserve.server.engine.core import PRECISIONS, CamEngine
from camserve.server.engine.layouts import LayoutHints
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
    METHODS,
    EngineError,
    LayerError,
    LayerSpec,
    RowRequest,
    RowResult,
)

__all__ = [
    "METHODS",
    "PRECISIONS",
    "CamEngine",
    "EngineError",
    "Geometry",
    "LayerError",
    "LayerSpec",
    "LayoutHints",
    "RowRequest",
    "RowResult",
    "normalise",
    "output_bytes",
    "shape_heatmaps",
    "to_input",
    "to_original",
    "to_size",
]
