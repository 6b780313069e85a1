"""A dynamic batcher: gathers items from many callers into batches for one processing function.

It knows nothing of torch or gRPC. Items wait until `max_batch_size` of them are queued or
`max_delay_s` has passed since the oldest arrived; then one batch is processed while the next one
gathers. Items have a cost (default 1; the runtime counts forward passes, so a follow-up chunk
of 32 masked images costs 32 and an explained image 1): the queue bound (`max_queue`) and the
batch size (`max_batch_size`) are in cost units, and a batch holds at least one item. Admission
is bounded, whole requests are admitted or refused together (room can be reserved before the
items exist, so a caller is refused before it spends work making them, and a request submitting
its items in waves holds room for all of them), items whose deadline passed are failed before
processing, and a caller that goes away takes its items out of the queue. Each item's outcome
(a result or an exception) goes to its own caller.

Adaptive wait (`adaptive=True`): when items arrive fast enough that the batch would fill within
half the time a batch takes to process, the oldest item waits up to that long instead of
`max_delay_s`. Closed-loop callers (each sends again once answered) come back spread over the
time their answers take to shape and send, while the others already wait in the queue; a fixed
short delay would then run the waiting ones alone and the returning ones in the next batch,
halving every batch. The wait goes on only while the batch would fill in time at the median of
the recent arrival gaps, and while arrivals keep coming (no pause longer than four gaps, or a
tenth of a batch's time, counted from the end of the last batch, before which its callers
cannot return); a lone caller waits at most that tenth longer than `max_delay_s`.

Supervision: a failing callback or processing step fails only its batch and the loop goes on;
should the loop task end anyway, every waiting caller is failed and new ones are refused at once
with `BatcherClosed`, never left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("camserve.batcher")
# The adaptive wait: at most this share of a batch's processing time, and never above the cap.
ADAPTIVE_SHARE = 0.5
ADAPTIVE_CAP_S = 1.0
PATIENCE_GAPS = 4  # a pause longer than this many arrival gaps ends the wait
PATIENCE_SHARE = 0.1  # ... or than this share of a batch's time, whichever is longer
GAP_SAMPLES = 16
T = TypeVar("T")
R = TypeVar("R")

ProcessFn = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


class QueueFull(Exception):
    """The queue cannot take these items now; `retry_after_s` estimates when it could.

    `wanted` is the cost asked for; above `capacity` (`oversized`) it is admitted only into an
    idle queue, and served in waves (`DynamicBatcher.reserve`).
    """

    def __init__(self, depth: int, capacity: int, retry_after_s: float, wanted: int = 1) -> None:
        super().__init__(f"queue holds {depth} of {capacity} items")
        self.depth = depth
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.wanted = wanted

    @property
    def oversized(self) -> bool:
        return self.wanted > self.capacity


class DeadlineExpired(Exception):
    """The item's deadline passed while it waited, so it was never processed."""


class BatcherClosed(Exception):
    """The batcher is shutting down (or its loop stopped) and accepts no more items."""


class Reservation:
    """Queue room held for items not made yet; `submit` uses it, `release` gives it back.

    `pending` is the cost the holder still needs beyond the room it holds: as its items leave
    the queue for a batch, their room comes back to the reservation until none is pending, so
    a request larger than the queue runs in waves without being refused halfway.
    """

    def __init__(self, owner: DynamicBatcher[Any, Any], count: int, pending: int = 0) -> None:
        self._owner = owner
        self.count = count
        self.pending = pending

    def release(self) -> None:
        """Gives the room back (again: a no-op), e.g. when making the items failed."""
        self.pending = 0
        self.take(self.count)

    def refill(self, cost: int) -> None:
        """Keeps `cost` of the room an item of this reservation just left, while any is pending."""
        back = min(cost, self.pending)
        self.pending -= back
        self.count += back
        self._owner._reserved += back

    def take(self, cost: int) -> int:
        """Hands up to `cost` of the held room to items being submitted; returns how much."""
        taken = min(self.count, cost)
        self._owner._reserved -= taken
        self.count -= taken
        return taken

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(eq=False)  # identity: queue removal must never compare payloads
class _Entry(Generic[T, R]):
    item: T
    deadline: float | None  # time.monotonic() value
    enqueued_at: float
    future: asyncio.Future[R]
    cost: int = 1
    reservation: Reservation | None = None  # whose room the entry's goes back to
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
        cost: Callable[[T], int] | None = None,
        adaptive: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_s >= 0")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._on_batch = on_batch  # (batch size, queue depth after taking it)
        self._on_expired = on_expired  # (items dropped for their deadline)
        self._cost = cost or (lambda _item: 1)
        self._queue: deque[_Entry[T, R]] = deque()
        self._queued_cost = 0  # the sum of the queued entries' costs
        self._reserved = 0  # room held by reservations, not yet filled with items
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stopped: BaseException | None = None  # why the loop ended, if it did
        self._running: list[_Entry[T, R]] = []  # the batch being processed
        self._batch_seconds = 0.0  # moving average, for retry hints and the adaptive wait
        self._adaptive = adaptive
        self._gaps: deque[float] = deque(maxlen=GAP_SAMPLES)  # recent times between items
        self._gap_s = 0.0  # their median: idle pauses between bursts do not skew it
        self._last_arrival = 0.0
        self._last_batch_end = 0.0

    @property
    def depth(self) -> int:
        """The cost of the items queued plus room reserved for items on their way."""
        return self._queued_cost + self._reserved

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
            self._task.add_done_callback(self._on_loop_end)

    def _on_loop_end(self, task: asyncio.Task[None]) -> None:
        """Fails every waiting caller if the loop ended before `close` asked it to."""
        if self._closed and not self._queue:
            return
        reason = (task.exception() if not task.cancelled() else None) or RuntimeError(
            "loop cancelled"
        )
        log.error("batcher loop stopped; refusing work", extra={"error": repr(reason)})
        self._stopped = reason
        for entry in [*self._running, *self._queue]:
            if not entry.future.done():
                entry.future.set_exception(BatcherClosed(f"the batcher stopped: {reason!r}"))
        self._queue.clear()
        self._queued_cost = 0

    async def close(self) -> None:
        """Stops admitting; items already queued are still processed before this returns."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    def retry_after_s(self) -> float:
        """A hint for refused callers: the time to work through the queue as it is now."""
        batches = max(1, -(-self._queued_cost // self._max_batch_size))
        return round(max(0.05, batches * self._batch_seconds), 3)

    def _admit(self, count: int) -> None:
        if self._stopped is not None:
            raise BatcherClosed(f"the batcher stopped: {self._stopped!r}")
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        if self.depth + count > self._max_queue:
            raise QueueFull(self.depth, self._max_queue, self.retry_after_s(), count)

    def reserve(self, count: int) -> Reservation:
        """Holds room for `count` items before they exist; QueueFull when there is none.

        A cost above the whole queue is admitted when the queue is idle: the reservation holds
        the whole queue and gets its items' room back as they start (`Reservation.pending`);
        under load it is refused with a retry hint like any other.
        """
        if count > self._max_queue and self.depth == 0 and not self._closed:
            self._admit(self._max_queue)
            self._reserved += self._max_queue
            return Reservation(self, self._max_queue, pending=count - self._max_queue)
        self._admit(count)
        self._reserved += count
        return Reservation(self, count)

    async def submit(
        self,
        items: Sequence[T],
        deadline: float | None = None,
        reservation: Reservation | None = None,
    ) -> list[tuple[R, BatchInfo]]:
        """Queues `items` together and waits for all; raises the first item's failure.

        Admission is all or nothing: `QueueFull` when the queue lacks room for every item, unless
        `reservation` (from `reserve`) already holds that room; room it holds beyond these items'
        cost stays held for the caller's next submission.
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            _Entry[T, R](
                item, deadline, now, loop.create_future(), max(1, self._cost(item)), reservation
            )
            for item in items
        ]
        cost = sum(entry.cost for entry in entries)
        taken = reservation.take(cost) if reservation is not None else 0
        try:
            self._admit(cost - taken)
        except BaseException:
            self._reserved += taken  # the reservation keeps its room
            if reservation is not None:
                reservation.count += taken
            raise
        self._queue.extend(entries)
        self._queued_cost += cost
        self._note_arrival(now, cost)
        self._arrived.set()
        try:
            if len(entries) == 1:  # most requests: no gathering future to make
                results = [await entries[0].future]
            else:
                results = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            for entry in entries:  # a caller that leaves frees its queue slots at once
                entry.future.cancel()
                with contextlib.suppress(ValueError):  # unless already in a running batch
                    self._queue.remove(entry)
                    self._queued_cost -= entry.cost
            raise
        return [
            (result, BatchInfo(size=e.batch_size, queue_s=e.started_at - e.enqueued_at))
            for result, e in zip(results, entries, strict=True)
        ]

    def _note_arrival(self, now: float, cost: int) -> None:
        if self._last_arrival:
            self._gaps.append((now - self._last_arrival) / cost)
            self._gap_s = statistics.median(self._gaps)
        self._last_arrival = now

    def _adaptive_timeout(self, now: float, start: float) -> float:
        """How much longer a partial batch may wait for more items (0: run it now); `start` is
        when the batcher was first free to run its oldest item. See the module docstring."""
        if not self._adaptive or not self._batch_seconds or not self._gap_s:
            return 0.0
        budget = min(ADAPTIVE_CAP_S, ADAPTIVE_SHARE * self._batch_seconds)
        left = budget - (now - start)
        missing = self._max_batch_size - self._queued_cost
        if left <= 0 or missing * self._gap_s > left:
            return 0.0  # the batch would not fill in time
        # Arrivals must keep coming: no pause longer than a few gaps (or, before the callers of
        # the batch that just ended are back, a tenth of a batch's time).
        patience = min(
            budget, max(PATIENCE_GAPS * self._gap_s, PATIENCE_SHARE * self._batch_seconds)
        )
        stall = now - max(self._last_arrival, self._last_batch_end)
        return max(0.0, min(left, patience - stall))

    async def _gather_batch(self) -> list[_Entry[T, R]]:
        """Waits for the first item, then for a full batch or the delay, whichever comes first."""
        while not self._queue:
            if self._closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        oldest = self._queue[0].enqueued_at
        while self._queued_cost < self._max_batch_size and not self._closed:
            now = time.monotonic()
            fixed_end = oldest + self._max_delay_s
            if now < fixed_end:
                timeout = fixed_end - now
            else:  # past the fixed delay: wait on only while arrivals keep coming, counted
                # from when the batcher was free to run the oldest item
                timeout = self._adaptive_timeout(now, max(fixed_end, self._last_batch_end))
                if timeout <= 0:
                    break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        batch: list[_Entry[T, R]] = []
        now = time.monotonic()
        expired = 0
        room = self._max_batch_size
        while self._queue and (not batch or self._queue[0].cost <= room):
            entry = self._queue.popleft()
            self._queued_cost -= entry.cost
            if entry.future.done():
                continue  # cancelled by its caller
            if entry.reservation is not None:
                entry.reservation.refill(entry.cost)
            if entry.deadline is not None and entry.deadline <= now:
                entry.future.set_exception(DeadlineExpired("deadline passed while queued"))
                expired += 1
                continue
            entry.started_at = now
            room -= entry.cost
            batch.append(entry)
        if expired:
            self._notify(self._on_expired, expired)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._gather_batch()
            if not batch:
                if self._closed and not self._queue:
                    return
                continue
            await self._run_batch(batch)

    def _notify(self, callback: Callable[..., None] | None, *args: int) -> None:
        """Calls an observer; its failure is logged and never reaches the loop."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - an observer must not stop batching
            log.exception("batcher callback failed")

    async def _run_batch(self, batch: list[_Entry[T, R]]) -> None:
        """Processes one batch and hands every item its outcome, whatever happens."""
        self._notify(self._on_batch, len(batch), self.depth)
        self._running = batch
        started = time.monotonic()
        try:
            outcomes = await self._process([e.item for e in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"process returned {len(outcomes)} results for {len(batch)}")
        except Exception as exc:  # noqa: BLE001 - every caller must learn of the failure
            outcomes = [exc] * len(batch)
        self._last_batch_end = time.monotonic()
        elapsed = self._last_batch_end - started
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
        self._running = []
