"""Helpers for the client tests: facts about the example photos, and a scripted stand-in
ExplainService for behaviour the real server cannot be made to show on demand (answers out of
order, a refusal followed by success, per-request errors).

The stand-in needs only grpcio, so its tests also pin down the wire contract the client relies
on: RetryInfo in `grpc-status-details-bin`, `authorization` metadata, request_id echoes.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from camserve.client import ModelInfo
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from camserve.v1.tensors import to_proto

CAT, ESPRESSO = 285, 967  # what the built-in model predicts for chelsea.jpg and coffee.jpg
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat: close calls for this photo
CAT_SIZE = (300, 451)  # height, width of chelsea.jpg

BAD = b"bad image"  # answered with an INVALID_ARGUMENT stream error
BUSY_ONCE = b"busy once"  # refused with RESOURCE_EXHAUSTED the first time it is seen
HEATMAP = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)


def rich_abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, retry_s: float):
    """Aborts with a google.rpc.Status carrying a RetryInfo detail, as the real server does."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=int(retry_s), nanos=int(retry_s * 1e9) % 10**9
            )
        )
    )
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


def answer(request: pb.ExplainRequest) -> pb.ExplainResponse:
    """A response that says which input it answers: the label is the image's bytes."""
    results = []
    for image in request.images:
        label = image.encoded.decode(errors="replace") if image.encoded else "tensor"
        results.append(
            pb.ImageResult(
                predictions=[pb.Prediction(index=7, label=label, probability=0.5, logit=1.0)],
                heatmaps=[
                    pb.Heatmap(
                        method=pb.METHOD_GRADCAM,
                        class_index=7,
                        class_label=label,
                        layer="features",
                        data=to_proto(HEATMAP),
                    )
                ],
            )
        )
    return pb.ExplainResponse(
        request_id=request.request_id,
        model="fake",
        model_version="0",
        results=results,
        batch_size=len(request.images),
    )


@dataclass
class FakeService(pb_grpc.ExplainServiceServicer):
    """Scripted answers; records what it was sent."""

    unary_failures: list[tuple[grpc.StatusCode, str, float]] = field(default_factory=list)
    reorder_window: int = 3
    metadata: list[dict[str, str]] = field(default_factory=list)
    explain_calls: int = 0
    stream_requests: list[pb.ExplainRequest] = field(default_factory=list)
    stream_answered: int = 0
    most_outstanding: int = 0  # most requests received and not yet answered at one time
    seen: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Explain(self, request, context):  # noqa: N802 - gRPC method name
        with self.lock:
            self.explain_calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failure = self.unary_failures.pop(0) if self.unary_failures else None
        if failure is not None:
            code, message, retry_s = failure
            if retry_s:
                rich_abort(context, code, message, retry_s)
            context.abort(code, message)
        return answer(request)

    def ExplainStream(self, request_iterator, context):  # noqa: N802 - gRPC method name
        """Answers what has arrived in windows, each in reverse order, to prove the client reorders.

        A window closes when it is full or when no request came for 50 ms, so the stand-in never
        waits for requests a bounded client will only send after hearing back.
        """
        incoming: queue.Queue[pb.ExplainRequest | None] = queue.Queue()

        def read() -> None:
            try:
                for request in request_iterator:
                    incoming.put(request)
            except grpc.RpcError:  # the client cancelled the call
                pass
            incoming.put(None)

        threading.Thread(target=read, daemon=True).start()
        ended = False
        while not ended:
            window = [incoming.get()]
            while window[-1] is not None and len(window) < self.reorder_window:
                try:
                    window.append(incoming.get(timeout=0.05))
                except queue.Empty:
                    break
            if window[-1] is None:
                ended = True
                window.pop()
            with self.lock:
                self.stream_requests.extend(window)
                self.most_outstanding = max(
                    self.most_outstanding, len(self.stream_requests) - self.stream_answered
                )
                self.stream_answered += len(window)
            yield from (self._stream_answer(r) for r in reversed(window))

    def _stream_answer(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        encoded = request.images[0].encoded
        if encoded == BAD:
            error = pb.Error(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="not an image")
            return pb.ExplainResponse(request_id=request.request_id, error=error)
        if encoded == BUSY_ONCE and encoded not in self.seen:
            self.seen.add(encoded)
            error = pb.Error(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                message="queue full",
                retry_after_s=0.05,
            )
            return pb.ExplainResponse(request_id=request.request_id, error=error)
        return answer(request)


def normalised(picture: Image.Image, model: ModelInfo) -> np.ndarray:
    """The model's input recipe done by hand: shorter side to `resize`, centre crop, normalise."""
    spec = model.input
    scale = spec.resize / min(picture.size)
    resized = picture.resize(
        (round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - spec.width) // 2, (resized.height - spec.height) // 2
    crop = resized.crop((left, top, left + spec.width, top + spec.height))
    pixels = np.asarray(crop, np.float32) / 255
    return ((pixels - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
