"""Retry waits and stopping rules, without a server or real sleeping."""

from __future__ import annotations

import random

import grpc
import pytest

from camserve.client import retry
from camserve.client.errors import InvalidArgument, Overloaded, Unavailable
from camserve.client.retry import RetryPolicy, call_with_retry, call_with_retry_async

UNAVAILABLE = Unavailable("down", code=grpc.StatusCode.UNAVAILABLE)


def overloaded(retry_after: float | None) -> Overloaded:
    return Overloaded("full", code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=retry_after)


def test_backoff_grows_exponentially_within_the_jitter_band() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=1.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [policy.delay(attempt, UNAVAILABLE, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling * 0.3  # jitter actually spreads the waits


def test_the_server_hint_is_a_floor() -> None:
    policy = RetryPolicy(initial_backoff_s=0.01, jitter=0.5)
    rng = random.Random(0)
    waits = [policy.delay(0, overloaded(2.0), rng) for _ in range(100)]
    assert all(2.0 <= w <= 3.0 for w in waits)
    assert policy.delay(0, overloaded(None), rng) <= 0.01


@pytest.mark.parametrize(
    "changes",
    [
        {"max_attempts": 0},
        {"initial_backoff_s": -1},
        {"initial_backoff_s": 2, "max_backoff_s": 1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_bad_policies_are_refused(changes) -> None:
    with pytest.raises(ValueError, match="max_attempts|backoff|multiplier"):
        RetryPolicy(**changes)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the waits of the sync and async retry loops instead of sleeping."""
    waited: list[float] = []

    async def no_async_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(retry.time, "sleep", waited.append)
    monkeypatch.setattr(retry.asyncio, "sleep", no_async_sleep)
    return waited


def scripted(*outcomes):
    """An attempt function failing with the given errors in turn, then returning "ok"."""
    remaining = list(outcomes)
    budgets: list[float | None] = []

    def attempt(time_left: float | None) -> str:
        budgets.append(time_left)
        if remaining:
            raise remaining.pop(0)
        return "ok"

    attempt.budgets = budgets  # type: ignore[attr-defined]
    return attempt


def test_retryable_errors_are_retried_until_success(sleeps) -> None:
    attempt = scripted(UNAVAILABLE, overloaded(0.3))
    assert call_with_retry(attempt, policy=RetryPolicy(), timeout=None) == "ok"
    assert len(sleeps) == 2
    assert sleeps[1] >= 0.3


def test_other_errors_are_raised_at_once(sleeps) -> None:
    error = InvalidArgument("bad", code=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidArgument):
        call_with_retry(scripted(error), policy=RetryPolicy(), timeout=None)
    assert sleeps == []


def test_attempts_are_bounded(sleeps) -> None:
    attempt = scripted(*[UNAVAILABLE] * 10)
    with pytest.raises(Unavailable):
        call_with_retry(attempt, policy=RetryPolicy(max_attempts=3), timeout=None)
    assert len(attempt.budgets) == 3
    assert len(sleeps) == 2


def test_a_wait_past_the_deadline_is_not_started(sleeps) -> None:
    attempt = scripted(overloaded(5.0))
    with pytest.raises(Overloaded):
        call_with_retry(attempt, policy=RetryPolicy(), timeout=1.0)
    assert sleeps == []
    assert 0 < attempt.budgets[0] <= 1.0  # the attempt got the call's time


async def test_the_async_loop_follows_the_same_rules(sleeps) -> None:
    async def attempt(time_left: float | None) -> str:
        return sync_attempt(time_left)

    sync_attempt = scripted(UNAVAILABLE)
    assert await call_with_retry_async(attempt, policy=RetryPolicy(), timeout=None) == "ok"
    assert len(sleeps) == 1
    sync_attempt = scripted(UNAVAILABLE, UNAVAILABLE)
    with pytest.raises(Unavailable):
        await call_with_retry_async(attempt, policy=retry.NO_RETRY, timeout=None)
