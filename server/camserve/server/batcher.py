"""A dynamic batcher: gathers items from many callers into batches for one processing function.

It knows nothing of torch or gRPC. Items wait until `max_batch_size` of them are queued or
`max_delay_s` has passed since the oldest arrived; then one batch is processed while the next one
gathers. Admission is bounded (`max_queue`), whole requests are admitted or refused together,
items whose deadline passed are failed before processing, and a caller that goes away takes its
items out of the queue. Each item's outcome (a result or an exception) goes to its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

ProcessFn = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


class QueueFull(Exception):
    """The queue cannot take these items now; `retry_after_s` estimates when it could."""

    def __init__(self, depth: int, capacity: int, retry_after_s: float) -> None:
        super().__init__(f"queue holds {depth} of {capacity} items")
        self.depth = depth
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class DeadlineExpired(Exception):
    """The item's deadline passed while it waited, so it was never processed."""


class BatcherClosed(Exception):
    """The batcher is shutting down and accepts no more items."""


@dataclass(eq=False)  # identity: queue removal must never compare payloads
class _Entry(Generic[T, R]):
    item: T
    deadline: float | None  # time.monotonic() value
    enqueued_at: float
    future: asyncio.Future[R]
    started_at: float = field(default=0.0)
    batch_size: int = field(default=0)


@dataclass(frozen=True)
class BatchInfo:
    """What the caller of `submit` learns about the batch its item ran in."""

    size: int
    queue_s: float


class DynamicBatcher(Generic[T, R]):
    """Gathers items into batches for `process`, one batch at a time, from one background task."""

    def __init__(
        self,
        process: ProcessFn[T, R],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_s >= 0")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._on_batch = on_batch  # (batch size, queue depth after taking it)
        self._on_expired = on_expired  # (items dropped for their deadline)
        self._queue: deque[_Entry[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._batch_seconds = 0.0  # moving average, for retry hints

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stops admitting; items already queued are still processed before this returns."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    def retry_after_s(self) -> float:
        """A hint for refused callers: the time to work through the queue as it is now."""
        batches = max(1, -(-len(self._queue) // self._max_batch_size))
        return round(max(0.05, batches * self._batch_seconds), 3)

    async def submit(
        self, items: Sequence[T], deadline: float | None = None
    ) -> list[tuple[R, BatchInfo]]:
        """Queues `items` together and waits for all; raises the first item's failure.

        Admission is all or nothing: `QueueFull` when the queue lacks room for every item.
        """
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        if len(self._queue) + len(items) > self._max_queue:
            raise QueueFull(len(self._queue), self._max_queue, self.retry_after_s())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [_Entry[T, R](item, deadline, now, loop.create_future()) for item in items]
        self._queue.extend(entries)
        self._arrived.set()
        try:
            results = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            for entry in entries:  # a caller that leaves frees its queue slots at once
                entry.future.cancel()
                with contextlib.suppress(ValueError):  # unless already in a running batch
                    self._queue.remove(entry)
            raise
        return [
            (result, BatchInfo(size=e.batch_size, queue_s=e.started_at - e.enqueued_at))
            for result, e in zip(results, entries, strict=True)
        ]

    async def _gather_batch(self) -> list[_Entry[T, R]]:
        """Waits for the first item, then for a full batch or the delay, whichever comes first."""
        while not self._queue:
            if self._closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        oldest = self._queue[0].enqueued_at
        while len(self._queue) < self._max_batch_size and not self._closed:
            remaining = oldest + self._max_delay_s - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Entry[T, R]] = []
        now = time.monotonic()
        expired = 0
        while self._queue and len(batch) < self._max_batch_size:
            entry = self._queue.popleft()
            if entry.future.done():
                continue  # cancelled by its caller
            if entry.deadline is not None and entry.deadline <= now:
                entry.future.set_exception(DeadlineExpired("deadline passed while queued"))
                expired += 1
                continue
            entry.started_at = now
            batch.append(entry)
        if expired and self._on_expired is not None:
            self._on_expired(expired)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._gather_batch()
            if not batch:
                if self._closed and not self._queue:
                    return
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch), len(self._queue))
            started = time.monotonic()
            try:
                outcomes = await self._process([e.item for e in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"process returned {len(outcomes)} results for {len(batch)}")
            except Exception as exc:  # noqa: BLE001 - every caller must learn of the failure
                outcomes = [exc] * len(batch)
            elapsed = time.monotonic() - started
            average = self._batch_seconds
            self._batch_seconds = elapsed if not average else 0.8 * average + 0.2 * elapsed
            for entry, outcome in zip(batch, outcomes, strict=True):
                entry.batch_size = len(batch)
                if entry.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    entry.future.set_exception(outcome)
                else:
                    entry.future.set_result(outcome)
