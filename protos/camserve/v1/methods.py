"""The CAM methods' wire enum values and their names, shared by the client and the server."""

from __future__ import annotations

from camserve.v1 import explain_pb2 as pb

# Names in the order documented everywhere; each maps to its wire enum value.
METHOD_BY_NAME: dict[str, int] = {
    "gradcam": pb.METHOD_GRADCAM,
    "gradcampp": pb.METHOD_GRADCAMPP,
    "xgradcam": pb.METHOD_XGRADCAM,
    "hirescam": pb.METHOD_HIRESCAM,
    "layercam": pb.METHOD_LAYERCAM,
}
# Wire value to name; METHOD_UNSPECIFIED means Grad-CAM.
NAME_BY_METHOD: dict[int, str] = {
    pb.METHOD_UNSPECIFIED: "gradcam",
    **{value: name for name, value in METHOD_BY_NAME.items()},
}
