"""Domain records to camserve.v1 messages: responses, stream errors, model descriptions.

Torch-free, like the servicer that calls it. Heatmap arrays already carry the wire dtype the
request asked for, so encoding is a byte copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from camserve.server import wire
from camserve.server.kernels import KernelView
from camserve.server.records import (
    ExplainOutcome,
    HeatmapResult,
    ImageExplanation,
    MethodInfo,
    ModelStatus,
)
from camserve.server.wire import HeatmapPart, ImagePart
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.scores import CURVE_FIELDS
from camserve.v1.tensors import fill_header, to_proto

Metadata = tuple[tuple[str, str | bytes], ...]
GATE_KINDS = {"channel": pb.GATE_KIND_CHANNEL, "spatial": pb.GATE_KIND_SPATIAL}


class EncodedResponse(NamedTuple):
    """An ExplainResponse already serialised (on a worker thread, so a large answer never holds
    the event loop), with what the observability interceptor reads of it."""

    data: bytes
    timing: pb.Timing


def _heatmap(result: HeatmapResult) -> HeatmapPart:
    """One heatmap in the pieces `wire` joins; only the scores and curves it was given are set:
    unset means not asked for."""
    head = pb.Heatmap(
        method=cast("pb.Method", METHOD_BY_NAME[result.method]),
        class_index=result.class_index,
        class_label=result.class_label,
        layer=result.layer,
    )
    tensor = pb.Tensor()
    payload = fill_header(tensor, result.data)
    tail = pb.Heatmap()
    for name, value in result.scores.items():
        setattr(tail, name, value)  # each score's field has its (engine) name
    for name, curve in result.curves.items():
        getattr(tail, CURVE_FIELDS[name]).extend(curve)
    if result.convergence_delta is not None:
        tail.convergence_delta = result.convergence_delta
    return HeatmapPart(head, tensor, payload, tail)


def _inspection(image: ImageExplanation) -> pb.ImageResult | None:
    """The image's feature maps and gate values: the fields after its overlay."""
    if not image.feature_maps and not image.gates:
        return None
    return pb.ImageResult(
        feature_maps=[
            pb.FeatureMap(
                layer=found.layer,
                data=to_proto(found.data),
                channels=found.channels,
                channel_means=found.means,
                channel_maxes=found.maxes,
            )
            for found in image.feature_maps
        ],
        gates=[
            pb.GateValues(
                name=gate.name,
                kind=GATE_KINDS[gate.kind],
                data=to_proto(gate.data),
            )
            for gate in image.gates
        ],
    )


def _image(image: ImageExplanation) -> ImagePart:
    head = pb.ImageResult(
        predictions=[
            pb.Prediction(index=p.index, label=p.label, probability=p.probability, logit=p.logit)
            for p in image.predictions
        ]
    )
    heatmaps = [_heatmap(heatmap) for heatmap in image.heatmaps]
    return ImagePart(head, heatmaps, image.overlay_png, _inspection(image))


def encoded_response(request_id: str, outcome: ExplainOutcome) -> EncodedResponse:
    """The answer to one request, serialised (timings in milliseconds). Heatmap and overlay
    bytes are copied once, into the answer (`camserve.server.wire`)."""
    times = outcome.times
    timing = pb.Timing(
        queue_ms=1000 * times.queue_s,
        preprocess_ms=1000 * times.preprocess_s,
        compute_ms=1000 * times.compute_s,
        total_ms=1000 * times.total_s,
    )
    head = pb.ExplainResponse(
        request_id=request_id, model=outcome.model, model_version=outcome.model_version
    )
    tail = pb.ExplainResponse(timing=timing, batch_size=outcome.batch_size)
    images = [_image(image) for image in outcome.images]
    return EncodedResponse(wire.serialise(head, images, tail), timing)


def explain_response(request_id: str, outcome: ExplainOutcome) -> pb.ExplainResponse:
    """The answer to one request as a message (what `encoded_response` sends, parsed)."""
    return pb.ExplainResponse.FromString(encoded_response(request_id, outcome).data)


def serializer(encode: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that sends EncodedResponses as they are and encodes the rest."""

    def serialize(response: Any) -> bytes:
        if isinstance(response, EncodedResponse):
            return response.data
        return encode(response)

    return serialize


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
    """A model's description; only its name, version and readiness while it loads. `ready`
    is false while it loads and while it is failing."""
    info = pb.ModelInfo(
        name=status.name,
        version=status.version,
        ready=status.meta is not None and status.serving,
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
    info.methods.extend(cast("pb.Method", METHOD_BY_NAME[m.method]) for m in meta.methods)
    info.method_costs.extend(_method_cost(cost) for cost in meta.methods)
    info.conv_layers.extend(
        pb.ConvLayerInfo(name=conv.name, weight_shape=conv.weight_shape, groups=conv.groups)
        for conv in meta.conv_layers
    )
    info.gates.extend(
        pb.GateInfo(
            name=gate.name, kind=GATE_KINDS[gate.kind], shape=gate.shape, module=gate.module
        )
        for gate in meta.gates
    )
    return info


def _method_cost(cost: MethodInfo) -> pb.MethodCost:
    return pb.MethodCost(
        method=cast("pb.Method", METHOD_BY_NAME[cost.method]),
        rows_per_image=cost.rows,
        forward_passes=cost.forward_passes,
    )


def kernels_response(view: KernelView) -> pb.GetKernelsResponse:
    """A conv layer's weights and/or one page of their grid."""
    response = pb.GetKernelsResponse(
        model=view.model, model_version=view.version, layer=view.layer, colour=view.colour
    )
    if view.weights is not None:
        response.weights.CopyFrom(to_proto(view.weights))
    page = view.page
    if page is not None:
        response.grid_png = page.png
        response.page, response.pages, response.tiles = page.page, page.pages, page.tiles
        response.first_filter, response.end_filter = page.first_filter, page.end_filter
        response.columns, response.rows = page.columns, page.rows
    return response
