"""The CAM engine: Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM for whole batches.

`CamEngine` runs the model; `shaping` turns its raw feature-resolution maps into pixels. The
default-layer rule is described in `camserve.server.engine.layers`.
"""

from camserve.server.engine.core import PRECISIONS, CamEngine
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
    "METHODS",
    "PRECISIONS",
    "CamEngine",
    "EngineError",
    "Geometry",
    "LayerError",
    "LayerSpec",
    "RowRequest",
    "RowResult",
    "normalise",
    "to_input",
    "to_original",
    "to_size",
]
