"""Retrying calls that failed for reasons that pass: UNAVAILABLE and RESOURCE_EXHAUSTED.

Waits grow exponentially with random jitter (so many clients do not retry in step) and are never
shorter than the server's own hint (`Overloaded.retry_after`). Retries never outlast the call's
overall deadline: each attempt gets the time that is left, and a wait that would end after the
deadline is not started; the last error is raised instead.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from camserve.client.errors import CamserveError, Overloaded, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; `max_attempts=1` turns retrying off."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # a wait is drawn from [backoff * (1 - jitter), backoff]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1; got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("need multiplier >= 1 and 0 <= jitter <= 1")

    def delay(self, retry: int, error: CamserveError, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based) after `error`."""
        draw = (rng or random).random()
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        wait = backoff * (1 - self.jitter * draw)
        hint = error.retry_after if isinstance(error, Overloaded) else None
        if hint is not None:
            # The server knows when it expects room; spread the retries just after that moment.
            wait = max(wait, hint * (1 + self.jitter * draw))
        return wait


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


def is_retryable(error: CamserveError) -> bool:
    """UNAVAILABLE always; RESOURCE_EXHAUSTED when the server hints at a retry time. Without a
    hint the request exceeds what the server could ever admit, and retrying cannot help."""
    if isinstance(error, Overloaded):
        return error.retry_after is not None
    return isinstance(error, Unavailable)


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (never negative), or None without one."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _wait_or_raise(
    policy: RetryPolicy, retry: int, error: CamserveError, deadline: float | None
) -> float:
    if retry + 1 >= policy.max_attempts or not is_retryable(error):
        raise error
    wait = policy.delay(retry, error)
    left = remaining(deadline)
    if left is not None and wait >= left:
        raise error
    return wait


def call_with_retry(
    attempt: Callable[[float | None], T], *, policy: RetryPolicy, timeout: float | None
) -> T:
    """Runs `attempt(time_left)` until it succeeds or the policy or deadline says stop."""
    deadline = deadline_after(timeout)
    retry = 0
    while True:
        try:
            return attempt(remaining(deadline))
        except CamserveError as error:
            time.sleep(_wait_or_raise(policy, retry, error, deadline))
            retry += 1


async def call_with_retry_async(
    attempt: Callable[[float | None], Awaitable[T]],
    *,
    policy: RetryPolicy,
    timeout: float | None,  # noqa: ASYNC109 - becomes each attempt's gRPC deadline
) -> T:
    """The asyncio form of `call_with_retry`."""
    deadline = deadline_after(timeout)
    retry = 0
    while True:
        try:
            return await attempt(remaining(deadline))
        except CamserveError as error:
            await asyncio.sleep(_wait_or_raise(policy, retry, error, deadline))
            retry += 1
