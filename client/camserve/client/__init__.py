"""Python client of camserve: Grad-CAM explanations from a gRPC server, without torch.

from camserve.client import Client, overlay

with Client(address="127.0.0.1:50051") as client:
    explanation = client.explain("cat.jpg", methods=["gradcam", "layercam"])
overlay("cat.jpg", explanation.heatmap("layercam")).save("cat_layercam.png")
"""

from camserve.client.aio import AsyncClient
from camserve.client.connection import TLSConfig
from camserve.client.errors import (
    CamserveError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from camserve.client.kernels import ConvLayerInfo, Kernels
from camserve.client.render import colormap, overlay, panel
from camserve.client.results import (
    Explanation,
    FeatureMap,
    GateInfo,
    GateValues,
    InputSpec,
    LayerInfo,
    MethodCost,
    ModelInfo,
    Prediction,
    Timing,
)
from camserve.client.retry import RetryPolicy
from camserve.client.sync import Client

__all__ = [
    "AsyncClient",
    "CamserveError",
    "Client",
    "ConvLayerInfo",
    "DeadlineExceeded",
    "Explanation",
    "FeatureMap",
    "GateInfo",
    "GateValues",
    "InputSpec",
    "InvalidArgument",
    "Kernels",
    "LayerInfo",
    "MethodCost",
    "ModelInfo",
    "NotFound",
    "Overloaded",
    "Prediction",
    "RetryPolicy",
    "ServerError",
    "TLSConfig",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "colormap",
    "overlay",
    "panel",
]
