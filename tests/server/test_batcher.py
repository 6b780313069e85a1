"""The dynamic batcher on its own: no torch, no gRPC; timing controlled with events, not sleeps."""

from __future__ import annotations

import asyncio
import time

import pytest

from camserve.server.batcher import BatcherClosed, DeadlineExpired, DynamicBatcher, QueueFull


class Recorder:
    """A processing function that records batches and can be held closed."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.entered.set()
        await self.gate.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def make(recorder: Recorder, **options: float) -> DynamicBatcher[int, int]:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        recorder,
        max_batch_size=int(options.get("max_batch_size", 4)),
        max_delay_s=options.get("max_delay_s", 0.05),
        max_queue=int(options.get("max_queue", 16)),
    )
    batcher.start()
    return batcher


async def test_concurrent_items_share_batches_and_get_their_own_results() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=4, max_delay_s=0.5)
    outcomes = await asyncio.gather(*(batcher.submit([i]) for i in range(8)))
    assert [result for ((result, _),) in outcomes] == [i * 10 for i in range(8)]
    assert [len(b) for b in recorder.batches] == [4, 4]  # full batches go without waiting
    assert all(info.size == 4 for ((_, info),) in outcomes)
    await batcher.close()


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=64, max_delay_s=0.05)
    started = time.monotonic()
    ((result, info),) = await batcher.submit([3])
    assert result == 30
    assert info.size == 1
    assert time.monotonic() - started < 1.0
    await batcher.close()


async def test_one_failing_item_fails_alone() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=3, max_delay_s=0.5)
    results = await asyncio.gather(
        batcher.submit([1]), batcher.submit([-1]), batcher.submit([2]), return_exceptions=True
    )
    assert results[0][0][0] == 10
    assert results[2][0][0] == 20
    assert isinstance(results[1], ValueError)
    await batcher.close()


async def test_full_queue_refuses_whole_requests_at_once() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = make(recorder, max_batch_size=1, max_delay_s=0, max_queue=2)
    running = asyncio.create_task(batcher.submit([1]))
    await recorder.entered.wait()  # item 1 is being processed; the queue is empty
    queued = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as refused:
        await batcher.submit([3, 4])  # needs 2 slots, 1 left: refused whole
    assert refused.value.retry_after_s > 0
    recorder.gate.set()
    assert (await running)[0][0] == 10
    assert (await queued)[0][0] == 20
    await batcher.close()


async def test_expired_items_are_never_processed() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = make(recorder, max_batch_size=1, max_delay_s=0)
    running = asyncio.create_task(batcher.submit([1]))
    await recorder.entered.wait()
    late = asyncio.create_task(batcher.submit([2], deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
    recorder.gate.set()
    with pytest.raises(DeadlineExpired):
        await late
    await running
    assert recorder.batches == [[1]]
    await batcher.close()


async def test_a_cancelled_caller_frees_its_slot() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = make(recorder, max_batch_size=1, max_delay_s=0, max_queue=1)
    running = asyncio.create_task(batcher.submit([1]))
    await recorder.entered.wait()
    waiting = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0)
    assert batcher.depth == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.depth == 0
    replacement = asyncio.create_task(batcher.submit([3]))  # fits in the freed slot
    recorder.gate.set()
    await running
    assert (await replacement)[0][0] == 30
    assert [1, 2] not in recorder.batches
    assert [2] not in recorder.batches
    await batcher.close()


async def test_close_finishes_queued_items_then_refuses() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2, max_delay_s=10)
    pending = [asyncio.create_task(batcher.submit([i])) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [(await task)[0][0] for task in pending] == [0, 10, 20]
    with pytest.raises(BatcherClosed):
        await batcher.submit([5])


async def test_a_failing_observer_does_not_stop_batching() -> None:
    def explode(*_: int) -> None:
        raise RuntimeError("observer bug")

    recorder = Recorder()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        recorder, max_batch_size=2, max_delay_s=0.01, max_queue=8, on_batch=explode
    )
    batcher.start()
    assert [r for r, _ in await batcher.submit([1, 2])] == [10, 20]
    assert [r for r, _ in await batcher.submit([3])] == [30]  # the loop is still alive
    await batcher.close()


async def test_a_dead_loop_fails_waiting_callers_and_refuses_new_ones_at_once() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = make(recorder, max_batch_size=1, max_delay_s=0)
    running = asyncio.create_task(batcher.submit([1]))
    await recorder.entered.wait()
    waiting = asyncio.create_task(batcher.submit([2]))
    await asyncio.sleep(0)
    assert batcher._task is not None
    batcher._task.cancel()  # the loop dies for a reason the batcher did not choose
    with pytest.raises((BatcherClosed, asyncio.CancelledError)):
        await running
    with pytest.raises(BatcherClosed, match="stopped"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(BatcherClosed, match="stopped"):
        await asyncio.wait_for(batcher.submit([3]), 5)


async def test_reserved_room_counts_until_used_or_released() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_queue=3, max_delay_s=0)
    reservation = batcher.reserve(2)
    assert batcher.depth == 2
    with pytest.raises(QueueFull):
        batcher.reserve(2)
    with reservation:
        results = await batcher.submit([1, 2], reservation=reservation)
    assert [r for r, _ in results] == [10, 20]
    spare = batcher.reserve(3)
    spare.release()
    spare.release()  # a second release gives nothing back twice
    assert batcher.depth == 0
    await batcher.close()


def costed(recorder: Recorder, **options: int) -> DynamicBatcher[int, int]:
    """A batcher whose items cost their own value (a stand-in for rows of forward passes)."""
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        recorder,
        max_batch_size=options.get("max_batch_size", 8),
        max_delay_s=0.01,
        max_queue=options.get("max_queue", 16),
        cost=lambda item: item,
    )
    batcher.start()
    return batcher


async def test_costly_items_fill_batches_and_the_queue_by_their_cost() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = costed(recorder, max_batch_size=8, max_queue=16)
    first = asyncio.ensure_future(batcher.submit([1]))
    await recorder.entered.wait()  # a running batch holds no queue room
    waiting = [asyncio.ensure_future(batcher.submit([item])) for item in (5, 4, 3, 2)]
    await asyncio.sleep(0)
    assert batcher.depth == 14
    with pytest.raises(QueueFull) as refused:
        await batcher.submit([3])  # 14 + 3 > 16
    assert not refused.value.oversized
    assert refused.value.wanted == 3
    with pytest.raises(QueueFull) as never:
        await batcher.submit([17])
    assert never.value.oversized  # only a reservation may take it, into an idle queue
    recorder.gate.set()
    await asyncio.gather(first, *waiting)
    # Batches hold at most 8 cost units, in arrival order, at least one item each.
    assert recorder.batches == [[1], [5], [4, 3], [2]]
    assert batcher.depth == 0
    await batcher.close()


async def test_a_request_larger_than_the_queue_runs_in_waves_when_the_queue_is_idle() -> None:
    recorder = Recorder()
    batcher = costed(recorder, max_batch_size=4, max_queue=8)
    with batcher.reserve(20) as reservation:  # 20 > 8: admitted, the queue being idle
        assert (reservation.count, reservation.pending, batcher.depth) == (8, 12, 8)
        with pytest.raises(QueueFull) as refused:
            batcher.reserve(1)  # others wait meanwhile, with a hint
        assert refused.value.retry_after_s > 0
        for _ in range(5):  # waves of 4: each wave's room comes back as it starts
            await batcher.submit([2, 2], reservation=reservation)
            assert batcher.depth <= 8
        assert reservation.pending == 0
    assert batcher.depth == 0
    assert sum(map(sum, recorder.batches)) == 20
    await batcher.close()


async def test_a_request_larger_than_the_queue_is_refused_under_load_with_a_hint() -> None:
    recorder = Recorder()
    batcher = costed(recorder, max_batch_size=4, max_queue=8)
    with batcher.reserve(1):
        with pytest.raises(QueueFull) as refused:
            batcher.reserve(20)
        assert refused.value.oversized
        assert refused.value.retry_after_s > 0
    with batcher.reserve(20):  # idle again: admitted
        pass
    assert batcher.depth == 0
    await batcher.close()


async def test_a_reservation_is_used_up_across_waves_of_submissions() -> None:
    recorder = Recorder()
    batcher = costed(recorder, max_batch_size=8, max_queue=10)
    with batcher.reserve(9) as reservation:
        assert batcher.depth == 9
        with pytest.raises(QueueFull):
            batcher.reserve(2)  # the room is held for the waves to come
        await batcher.submit([4], reservation=reservation)
        assert reservation.count == 5
        assert batcher.depth == 5
        await batcher.submit([3, 2], reservation=reservation)
        assert reservation.count == 0
        # Beyond the reservation, a submission is admitted against the free room as usual.
        await batcher.submit([6], reservation=reservation)
    assert batcher.depth == 0
    await batcher.close()


class SlowRecorder(Recorder):
    """A recorder whose batches take `seconds` each, like a model on a slow device."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        await asyncio.sleep(self.seconds)
        return [i * 10 for i in items]


async def _trickle(batcher: DynamicBatcher[int, int], count: int, gap_s: float) -> None:
    """`count` single-item callers arriving `gap_s` apart, as closed-loop clients come back."""
    calls = []
    for index in range(count):
        calls.append(asyncio.create_task(batcher.submit([index])))
        await asyncio.sleep(gap_s)
    await asyncio.gather(*calls)


@pytest.mark.parametrize("adaptive", [False, True])
async def test_the_adaptive_wait_gathers_returning_callers_into_full_batches(
    adaptive: bool,
) -> None:
    """Closed-loop callers: three wait in the queue while a 0.2 s batch runs, five come back
    10 ms apart once it ends. A 2 ms delay runs the three alone; the adaptive wait (up to half
    a batch) takes all eight together."""
    recorder = SlowRecorder(0.2)
    batcher = DynamicBatcher(
        recorder, max_batch_size=8, max_delay_s=0.002, max_queue=64, adaptive=adaptive
    )
    batcher.start()
    await batcher.submit([99])  # one batch, so the batcher knows what a batch costs
    recorder.batches.clear()
    first = asyncio.create_task(_trickle(batcher, 4, 0.01))  # one runs, three queue
    await asyncio.sleep(0.2)  # about when the first batch (2 ms delay, then 0.2 s) ends
    await _trickle(batcher, 5, 0.01)
    await first
    sizes = [len(batch) for batch in recorder.batches]
    if adaptive:
        assert sizes == [1, 8]
    else:
        assert sizes[0] == 1, sizes
        assert len(sizes) >= 3, sizes
        assert max(sizes) < 8, sizes
    await batcher.close()


async def test_the_adaptive_wait_holds_a_lone_item_only_briefly() -> None:
    """After a pause in arrivals, one item waits at most a tenth of a batch's time (0.4 s) past
    `max_delay_s`, not the half a batch the adaptive wait allows while arrivals flow."""
    recorder = SlowRecorder(0.4)
    batcher = DynamicBatcher(
        recorder, max_batch_size=8, max_delay_s=0.002, max_queue=64, adaptive=True
    )
    batcher.start()
    await _trickle(batcher, 4, 0.005)  # a quick burst: a short average gap
    await asyncio.sleep(0.5)
    started = time.monotonic()
    ((_, info),) = await batcher.submit([7])
    assert info.queue_s < 0.002 + 0.04 + 0.03, info
    assert time.monotonic() - started < 0.4 + 0.15
    await batcher.close()
