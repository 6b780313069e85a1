"""A stream reads at most its window of requests ahead of the answers it has sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from camserve.server.streams import answer_stream

pytestmark = pytest.mark.timeout(30)


async def test_a_stream_reads_no_further_than_its_window_while_answers_wait() -> None:
    window, sent = 4, 20
    read: list[int] = []
    release = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        for i in range(sent):
            read.append(i)
            yield i

    async def answer(request: int) -> int:
        await release.wait()  # nothing is answered until the test says so
        return request

    def fail(request: int, exc: Exception) -> int:
        raise AssertionError(f"request {request} failed: {exc!r}")

    answers = answer_stream(requests(), answer, fail, window)
    first = asyncio.ensure_future(anext(answers))
    for _ in range(50):  # ample turns of the loop for the reader to run ahead if it could
        await asyncio.sleep(0)
    assert len(read) == window
    release.set()
    got = [await first] + [response async for response in answers]
    assert sorted(got) == list(range(sent))
    assert len(read) == sent


async def test_a_reader_that_stops_reading_holds_the_stream_at_its_window() -> None:
    window = 3
    read: list[int] = []

    async def requests() -> AsyncIterator[int]:
        for i in range(100):
            read.append(i)
            yield i

    async def answer(request: int) -> int:
        return request

    def fail(request: int, exc: Exception) -> int:
        raise AssertionError(f"request {request} failed: {exc!r}")

    answers = answer_stream(requests(), answer, fail, window)
    assert await anext(answers) == 0  # one answer taken by the transport, then no more reads
    for _ in range(50):
        await asyncio.sleep(0)
    # Its slot comes back only once the transport asks for the next answer: nothing more read.
    assert len(read) == window
    await answers.aclose()
