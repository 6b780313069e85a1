"""Refusals apart from faults: the one place a failure met while computing a request is judged.

A refusal is the caller's to fix or retry (a bad argument the engine found, a full queue, a
passed deadline). A fault is the model's or the server's: non-finite logits or maps, a model in
a bad state (`ModelFault`), a device error, a bug. `service_error` turns either into the domain
error the servicer answers with, and `is_fault` says which failures count against the model's
health (`camserve.server.health`), so both read the same judgement.

Non-finite outputs are found here too, on the host copies the engine already made, row by row:
a row whose logits or maps hold NaN or Inf fails alone, and the rest of its batch is answered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camserve.server import batcher
from camserve.server.engine import EngineError, ModelFault, RowResult
from camserve.server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    OutOfMemory,
    Overloaded,
    ServerFault,
    ServiceError,
    Unavailable,
    server_fault,
)

# Refusals: what the caller can fix, or what the queue did not take.
_REFUSALS = (
    EngineError,
    batcher.QueueFull,
    batcher.DeadlineExpired,
    batcher.BatcherClosed,
)


def is_fault(exc: BaseException) -> bool:
    """True for failures of the model or the server, which count against its health; False for
    refusals (requests the engine or the queue would not take)."""
    if isinstance(exc, ServiceError):
        return isinstance(exc, ServerFault | OutOfMemory)
    return not isinstance(exc, _REFUSALS)


def finite(logits: torch.Tensor) -> bool:
    """Whether every value of `logits` (host float32) is finite."""
    return bool(torch.isfinite(logits).all())


def checked_row(result: RowResult) -> RowResult | ModelFault:
    """The row, or the fault of a model that gave it non-finite logits or maps."""
    if not finite(result.logits):
        return ModelFault("its logits for this image are NaN or Inf")
    if not all(finite(heatmap) for heatmap in result.maps.values()):
        return ModelFault(
            f"its activations or gradients at layer {result.layer!r} are NaN or Inf for this image"
        )
    return result


def checked_rows(results: Sequence[RowResult]) -> list[RowResult | ModelFault]:
    """`checked_row` for a whole batch: one check over every row's logits and maps when all
    are finite (the rule), row by row only when some value is not; a few torch calls per
    batch rather than several per image."""
    values = [t.reshape(-1) for r in results for t in (r.logits, *r.maps.values())]
    if not values or finite(torch.cat(values)):
        return list(results)
    return [checked_row(result) for result in results]


def service_error(exc: BaseException, model: str) -> ServiceError:
    """The domain error for a failure met while computing a request of `model`."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, batcher.QueueFull):
        return _overloaded(exc, model)
    if isinstance(exc, batcher.DeadlineExpired):
        return DeadlineExceeded(
            f"deadline passed while waiting in model {model!r}'s queue; the image was not "
            "computed. Allow more time or send fewer concurrent requests"
        )
    if isinstance(exc, batcher.BatcherClosed):
        return Unavailable(str(exc))
    if isinstance(exc, EngineError):
        return InvalidRequest(str(exc))
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory(
            f"model {model!r} ran out of device memory on a single image; send a smaller one",
            retry_after_s=1.0,
        )
    if isinstance(exc, ModelFault):
        return server_fault(exc, model, reason=str(exc))
    return server_fault(exc, model)


def _overloaded(exc: batcher.QueueFull, model: str) -> Overloaded:
    if exc.oversized:
        return Overloaded(
            f"this request costs {exc.wanted} forward passes of model {model!r} (a row per "
            "channel of the layer for methods that score channels, a row per step of a curve), "
            f"more than its whole queue of {exc.capacity}: it is served in waves once the model "
            f"is idle, and the queue holds {exc.depth} now. Retry after {exc.retry_after_s:.2f}s, "
            "or explain fewer images or classes per request, choose a layer with fewer "
            "channels, a single-pass method or fewer score steps",
            retry_after_s=exc.retry_after_s,
        )
    return Overloaded(
        f"model {model!r} is overloaded: its queue holds {exc.depth} of {exc.capacity} "
        f"images; retry after {exc.retry_after_s:.2f}s or lower your request rate",
        retry_after_s=exc.retry_after_s,
    )
