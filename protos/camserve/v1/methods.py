"""The CAM methods' wire enum values and their names, shared by the client and the server.

One table: every method the protocol names is offered by request validation, GetModel and the
SDK, so there is no second list to keep in step.
"""

from __future__ import annotations

from camserve.v1 import explain_pb2 as pb

# Wire value by name, in enum order (the order documented everywhere and used by the engine).
METHOD_BY_NAME: dict[str, int] = {
    "gradcam": pb.METHOD_GRADCAM,
    "gradcampp": pb.METHOD_GRADCAMPP,
    "xgradcam": pb.METHOD_XGRADCAM,
    "hirescam": pb.METHOD_HIRESCAM,
    "layercam": pb.METHOD_LAYERCAM,
    "gradcamelementwise": pb.METHOD_GRADCAM_ELEMENTWISE,
    "eigencam": pb.METHOD_EIGENCAM,
    "eigengradcam": pb.METHOD_EIGENGRADCAM,
    "ablationcam": pb.METHOD_ABLATIONCAM,
    "scorecam": pb.METHOD_SCORECAM,
    "saliency": pb.METHOD_SALIENCY,
    "input_x_gradient": pb.METHOD_INPUT_X_GRADIENT,
    "smoothgrad": pb.METHOD_SMOOTHGRAD,
    "integrated_gradients": pb.METHOD_INTEGRATED_GRADIENTS,
    "guided_backprop": pb.METHOD_GUIDED_BACKPROP,
    "guided_gradcam": pb.METHOD_GUIDED_GRADCAM,
}
# Wire value to name; METHOD_UNSPECIFIED means Grad-CAM.
NAME_BY_METHOD: dict[int, str] = {
    pb.METHOD_UNSPECIFIED: "gradcam",
    **{value: name for name, value in METHOD_BY_NAME.items()},
}
# The method explained when a request names none.
DEFAULT_METHOD: str = NAME_BY_METHOD[pb.METHOD_UNSPECIFIED]
