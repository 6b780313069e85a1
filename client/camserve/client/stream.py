"""Bookkeeping for `explain_many`: bounded in-flight, matching by request_id, input order, retries.

The server answers an ExplainStream in any order and echoes each request's request_id; this class
knows which input each id belongs to and hands results back strictly in input order. It does no
I/O, so the sync and asyncio clients drive the same logic, and tests drive it by hand.

"In flight" counts every input sent and not yet handed back, including answered ones that wait
for an earlier input: that bounds memory as well as the server's share of work.
A request answered with RESOURCE_EXHAUSTED or UNAVAILABLE is sent again after the retry
policy's wait (at least the server's `retry_after_s`), under a fresh request_id.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from camserve.client.errors import CamserveError, ServerError, from_stream_error
from camserve.client.images import ImageInput
from camserve.client.requests import ExplainOptions, build_request
from camserve.client.results import Explanation, explanations_from_response
from camserve.client.retry import RetryPolicy, is_retryable
from camserve.v1 import explain_pb2 as pb

Outcome = Explanation | CamserveError


@dataclass
class _Item:
    index: int
    request: pb.ExplainRequest
    attempt: int = 0


class StreamScheduler:
    """Decides what to send next and what to hand back; times are `time.monotonic()` values."""

    def __init__(
        self,
        images: Iterable[ImageInput],
        options: ExplainOptions,
        *,
        max_in_flight: int,
        retry: RetryPolicy,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1; got {max_in_flight}")
        self._images = enumerate(images)
        self._options = options
        self._max_in_flight = max_in_flight
        self._retry = retry
        self._deadline = deadline
        self._return_exceptions = return_exceptions
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._exhausted = False
        self._started = 0  # inputs taken from `images`
        self._next_out = 0  # the next input index to hand back
        self._on_wire: dict[str, _Item] = {}
        self._delayed: list[tuple[float, int, _Item]] = []  # (send at, index, item) heap
        self._done: dict[int, Outcome] = {}

    @property
    def finished(self) -> bool:
        """Every input has been handed back."""
        return self._exhausted and self._next_out == self._started

    @property
    def on_wire(self) -> int:
        return len(self._on_wire)

    def to_send(self, now: float) -> list[pb.ExplainRequest]:
        """Requests to write now: retries that are due, then new inputs while there is room."""
        out = []
        while self._delayed and self._delayed[0][0] <= now:
            out.append(self._send(heapq.heappop(self._delayed)[2]))
        while not self._exhausted and self._started - self._next_out < self._max_in_flight:
            taken = next(self._images, None)
            if taken is None:
                self._exhausted = True
                break
            index, image = taken
            self._started += 1
            request = build_request([image], self._options)
            out.append(self._send(_Item(index=index, request=request)))
        return out

    def wait_s(self, now: float) -> float:
        """With nothing on the wire: how long to sleep before the next retry is due."""
        if not self._delayed:
            return 0.0
        return max(self._delayed[0][0] - now, 0.0)

    def on_response(self, response: pb.ExplainResponse, now: float) -> None:
        """Files one response under its input (or schedules the input's retry)."""
        item = self._on_wire.pop(response.request_id, None)
        if item is None:
            raise ServerError(
                f"the server answered unknown request_id {response.request_id!r}",
                code=grpc.StatusCode.INTERNAL,
            )
        if response.HasField("error") and response.error.code != grpc.StatusCode.OK.value[0]:
            error = from_stream_error(
                response.error.code, response.error.message, response.error.retry_after_s
            )
            self._fail_or_retry(item, error, now)
            return
        results = explanations_from_response(response)
        if len(results) != 1:
            self._done[item.index] = ServerError(
                f"expected 1 result for request {response.request_id!r}, got {len(results)}",
                code=grpc.StatusCode.INTERNAL,
            )
            return
        self._done[item.index] = results[0]

    def ready(self) -> Iterator[Outcome]:
        """Outcomes that can be handed back now, in input order.

        A failed input raises its exception in its place, unless `return_exceptions` was set.
        """
        while self._next_out in self._done:
            outcome = self._done.pop(self._next_out)
            self._next_out += 1
            if isinstance(outcome, CamserveError) and not self._return_exceptions:
                raise outcome
            yield outcome

    def ended_early(self) -> ServerError:
        """The error for a stream the server closed while answers were still due."""
        return ServerError(
            f"the server closed the stream with {self.on_wire} requests unanswered",
            code=grpc.StatusCode.INTERNAL,
        )

    def _send(self, item: _Item) -> pb.ExplainRequest:
        request_id = f"{self._prefix}-{next(self._ids)}"
        item.request.request_id = request_id
        self._on_wire[request_id] = item
        return item.request

    def _fail_or_retry(self, item: _Item, error: CamserveError, now: float) -> None:
        if is_retryable(error) and item.attempt + 1 < self._retry.max_attempts:
            send_at = now + self._retry.delay(item.attempt, error)
            if self._deadline is None or send_at < self._deadline:
                item.attempt += 1
                heapq.heappush(self._delayed, (send_at, item.index, item))
                return
        self._done[item.index] = error
