"""Answering a bidirectional stream: many requests in flight, exactly one answer for each.

`answer_stream` reads requests while earlier ones compute and yields each answer as soon as it
is ready (out of order). Two promises hold whatever happens inside `answer`:

- Every request read gets exactly one answer: its result, or the `fail` answer built from the
  exception it raised (a refusal or a server fault alike). Nothing read is dropped.
- Back-pressure covers requests read and answers not yet sent: a slot is taken before the next
  request is read from the transport and given back only once its answer has been handed to the
  transport, so at most `limit` requests are read ahead of the answers sent. A caller that
  stops reading stops its own stream after `limit` requests; nothing else waits on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _End:
    """Marks the end of the answers."""


async def answer_stream(
    requests: AsyncIterable[Req],
    answer: Callable[[Req], Awaitable[Resp]],
    fail: Callable[[Req, Exception], Resp],
    limit: int,
) -> AsyncIterator[Resp]:
    """Yields one answer per request, at most `limit` computed or waiting to be sent."""
    ready: asyncio.Queue[Resp | _End] = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        try:
            response = await answer(request)
        except Exception as exc:  # noqa: BLE001 - turned into this request's own answer
            response = fail(request, exc)
        ready.put_nowait(response)

    async def read() -> None:
        incoming = aiter(requests)
        try:
            while True:
                await slots.acquire()  # before reading: never more than `limit` read ahead
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)  # no task starts after the last request was read
        finally:
            ready.put_nowait(_End())

    reader = asyncio.create_task(read())
    try:
        while not isinstance(response := await ready.get(), _End):
            yield response
            slots.release()  # only now: the answer has left
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
