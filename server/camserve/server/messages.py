"""Domain records to camserve.v1 messages: responses, stream errors, model descriptions.

Torch-free, like the servicer that calls it. Heatmap arrays already carry the wire dtype the
request asked for, so encoding is a byte copy.
"""

from __future__ import annotations

from typing import cast

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from camserve.server.records import (
    ExplainOutcome,
    HeatmapResult,
    ImageExplanation,
    MethodCostInfo,
    ModelStatus,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.scores import CURVE_FIELDS
from camserve.v1.tensors import to_proto

Metadata = tuple[tuple[str, str | bytes], ...]


def _heatmap(result: HeatmapResult) -> pb.Heatmap:
    """One heatmap with only the scores and curves it was given: unset means not asked for."""
    heatmap = pb.Heatmap(
        method=cast("pb.Method", METHOD_BY_NAME[result.method]),
        class_index=result.class_index,
        class_label=result.class_label,
        layer=result.layer,
        data=to_proto(result.data),
    )
    for name, value in result.scores.items():
        setattr(heatmap, name, value)  # each score's field has its (engine) name
    for name, curve in result.curves.items():
        getattr(heatmap, CURVE_FIELDS[name]).extend(curve)
    return heatmap


def _image_result(image: ImageExplanation) -> pb.ImageResult:
    return pb.ImageResult(
        predictions=[
            pb.Prediction(index=p.index, label=p.label, probability=p.probability, logit=p.logit)
            for p in image.predictions
        ],
        heatmaps=[_heatmap(h) for h in image.heatmaps],
        overlay_png=image.overlay_png,
    )


def explain_response(request_id: str, outcome: ExplainOutcome) -> pb.ExplainResponse:
    """The answer to one request, timings in milliseconds."""
    times = outcome.times
    return pb.ExplainResponse(
        request_id=request_id,
        model=outcome.model,
        model_version=outcome.model_version,
        results=[_image_result(image) for image in outcome.images],
        timing=pb.Timing(
            queue_ms=1000 * times.queue_s,
            preprocess_ms=1000 * times.preprocess_s,
            compute_ms=1000 * times.compute_s,
            total_ms=1000 * times.total_s,
        ),
        batch_size=outcome.batch_size,
    )


def error_response(
    request_id: str, code: int, message: str, retry_after_s: float
) -> pb.ExplainResponse:
    """A stream's answer to one request that failed; the stream itself goes on."""
    return pb.ExplainResponse(
        request_id=request_id,
        error=pb.Error(code=code, message=message, retry_after_s=retry_after_s),
    )


def retry_trailers(code: int, message: str, retry_after_s: float) -> Metadata:
    """A google.rpc.RetryInfo detail, the standard retry hint, as trailing metadata."""
    if not retry_after_s:
        return ()
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(
            seconds=int(retry_after_s), nanos=int(retry_after_s * 1e9) % 10**9
        )
    )
    detail = any_pb2.Any()
    detail.Pack(retry)
    status = status_pb2.Status(code=code, message=message, details=[detail])
    return tuple(rpc_status.to_status(status).trailing_metadata)


def model_info(status: ModelStatus) -> pb.ModelInfo:
    """A model's description; only its name, version and readiness while it loads."""
    info = pb.ModelInfo(
        name=status.name,
        version=status.version,
        ready=status.meta is not None,
        max_batch_size=status.max_batch_size,
    )
    meta = status.meta
    if meta is None:
        return info
    recipe = meta.recipe
    info.device = meta.device
    info.input.CopyFrom(
        pb.InputSpec(
            height=recipe.crop,
            width=recipe.crop,
            resize=recipe.resize,
            center_crop=bool(recipe.resize),
            mean=recipe.mean,
            std=recipe.std,
        )
    )
    info.num_classes = meta.num_classes
    info.labels.extend(meta.labels)
    info.default_layer = meta.default_layer
    info.layers.extend(
        pb.LayerInfo(name=layer.name, output_shape=layer.shape) for layer in meta.layers
    )
    info.methods.extend(cast("list[pb.Method]", list(METHOD_BY_NAME.values())))
    info.method_costs.extend(_method_cost(cost) for cost in meta.method_costs)
    return info


def _method_cost(cost: MethodCostInfo) -> pb.MethodCost:
    return pb.MethodCost(
        method=cast("pb.Method", METHOD_BY_NAME[cost.method]),
        rows_per_image=cost.rows,
        forward_passes=cost.forward_passes,
    )
