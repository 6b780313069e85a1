"""Soak: thousands of mixed requests against one in-process server, then look for leaks.

After a warm-up (so allocator pools, worker threads and caches exist before the baseline), 6000
requests of every kind run eight at a time: single images with varied methods, targets,
resolutions and dtypes, multi-image requests, streams, and a few bad requests. Afterwards:
resident memory grew less than 5%, no forward hook is left on any module of the served model,
the thread count is back to where it was, and every request was answered exactly once, in
agreement with the server's own `camserve_requests_total`.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from camserve.client import AsyncClient, CamserveError, Explanation, InvalidArgument, NotFound
from camserve.server.settings import Settings
from tests._support.servers import ServerThread, png_bytes, seeded_images
from tests._support.traffic import SERVING, health_status, small_resnet, vm_rss_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

WARMUP_REQUESTS = 500
SOAK_REQUESTS = 6000
CONCURRENCY = 8
TIME_LIMIT_S = 240.0
MAX_RSS_GROWTH = 0.05
CROP = 64
FEATURE_SIDE = 2  # resnet18's layer4 at a 64x64 input
METHODS = ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam"]
SIZES = [(64, 64), (80, 60), (96, 128), (50, 70)]
PICTURES = [
    image for i, size in enumerate(SIZES) for image in seeded_images(2, size=size, seed=20 + i)
]
FILES = [png_bytes(picture) for picture in PICTURES]


@dataclass
class Tally:
    """What the client sent and what came back, by kind; the server's counters must agree."""

    unary_ok: int = 0
    unary_refused: int = 0
    stream_items_ok: int = 0
    stream_items_refused: int = 0
    streams: int = 0
    requests_sent: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.unary_ok + self.unary_refused + self.stream_items_ok + self.stream_items_refused


@pytest.fixture(scope="module")
def server(resnet18_weights: Path) -> Iterator[ServerThread]:
    running = ServerThread(
        Settings(
            port=0,
            metrics_port=-1,
            http_port=0,
            models=(small_resnet(resnet18_weights, crop=CROP),),
        )
    )
    yield running
    running.stop(grace=1.0)


def expected_shape(resolution: Any, picture: int) -> tuple[int, int]:
    if resolution == "original":
        return PICTURES[picture].shape[:2]  # type: ignore[return-value]
    if resolution == "input":
        return (CROP, CROP)
    if resolution == "feature":
        return (FEATURE_SIDE, FEATURE_SIDE)
    return tuple(resolution)  # type: ignore[return-value]


class Workload:
    """Draws jobs from a seeded generator; each job sends one or more requests and checks them."""

    def __init__(self, client: AsyncClient, tally: Tally, tops: list[int], seed: int) -> None:
        self.client = client
        self.tally = tally
        self.tops = tops
        self.rng = random.Random(seed)

    def options(self) -> tuple[dict[str, Any], Any]:
        rng = self.rng
        resolution = rng.choice(["original", "input", "feature", (rng.randint(4, 40), 24)])
        options: dict[str, Any] = {
            "methods": rng.sample(METHODS, rng.randint(1, 3)),
            "resolution": resolution,
            "dtype": rng.choice(["float32", "float16", "uint8"]),
            "top_predictions": rng.randint(1, 5),
        }
        target = rng.choice(["predicted", "index", "top_k", "label"])
        if target == "index":
            options["target"] = [rng.randrange(1000), rng.randrange(1000)]
        elif target == "top_k":
            options["top_k"] = rng.randint(1, 3)
        elif target == "label":
            options["target"] = f"class_{rng.randrange(1000)}"
        return options, resolution

    def check(self, explanation: Explanation, picture: int, options: dict[str, Any]) -> None:
        shape = expected_shape(options["resolution"], picture)
        target = options.get("target")
        # A class asked for twice is explained once.
        classes = len(set(target)) if isinstance(target, list) else options.get("top_k", 1)
        if explanation.top.index != self.tops[picture]:
            self.tally.problems.append(f"picture {picture}: top {explanation.top.index}")
        if len(explanation.heatmaps) != classes * len(options["methods"]):
            self.tally.problems.append(f"{len(explanation.heatmaps)} heatmaps for {options}")
        for array in explanation.heatmaps.values():
            if array.shape != shape or not np.isfinite(array.astype(np.float32)).all():
                self.tally.problems.append(f"heatmap {array.shape} {array.dtype} for {options}")

    async def single(self) -> None:
        picture = self.rng.randrange(len(FILES))
        options, _ = self.options()
        self.tally.requests_sent += 1
        result = await self.client.explain(FILES[picture], **options)
        self.tally.unary_ok += 1
        self.check(result, picture, options)

    async def batch(self) -> None:
        pictures = [self.rng.randrange(len(FILES)) for _ in range(self.rng.randint(2, 4))]
        options, _ = self.options()
        self.tally.requests_sent += 1
        results = await self.client.explain_batch([FILES[p] for p in pictures], **options)
        self.tally.unary_ok += 1
        for result, picture in zip(results, pictures, strict=True):
            self.check(result, picture, options)

    async def stream(self) -> None:
        count = self.rng.randint(3, 8)
        pictures = [self.rng.randrange(len(FILES)) for _ in range(count)]
        bad_at = self.rng.randrange(count) if self.rng.random() < 0.3 else -1
        inputs = [b"not an image" if i == bad_at else FILES[p] for i, p in enumerate(pictures)]
        options, _ = self.options()
        self.tally.requests_sent += count
        self.tally.streams += 1
        outcomes = [
            outcome
            async for outcome in self.client.explain_many(
                inputs, max_in_flight=4, return_exceptions=True, **options
            )
        ]
        for i, outcome in enumerate(outcomes):
            if i == bad_at and isinstance(outcome, InvalidArgument):
                self.tally.stream_items_refused += 1
            elif i != bad_at and isinstance(outcome, Explanation):
                self.tally.stream_items_ok += 1
                self.check(outcome, pictures[i], options)
            else:
                self.tally.problems.append(f"stream item {i}: {outcome!r}"[:300])
        if len(outcomes) != count:
            self.tally.problems.append(f"stream answered {len(outcomes)} of {count}")

    async def bad(self) -> None:
        self.tally.requests_sent += 1
        kind = self.rng.choice(["garbage", "class", "layer", "model"])
        try:
            if kind == "garbage":
                await self.client.explain(b"\x89PNG garbage")
            elif kind == "class":
                await self.client.explain(FILES[0], target=5000)
            elif kind == "layer":
                await self.client.explain(FILES[0], layer="layer9")
            else:
                await self.client.explain(FILES[0], model="nope")
        except (InvalidArgument, NotFound):
            self.tally.unary_refused += 1
        else:
            self.tally.problems.append(f"bad request {kind} was answered")

    def next_job(self) -> Callable[[], Awaitable[None]]:
        roll = self.rng.random()
        if roll < 0.55:
            return self.single
        if roll < 0.75:
            return self.batch
        if roll < 0.95:
            return self.stream
        return self.bad


async def run(client: AsyncClient, tally: Tally, tops: list[int], total: int, seed: int) -> None:
    """CONCURRENCY workers draw jobs until `total` requests have been sent."""
    workload = Workload(client, tally, tops, seed)

    async def worker() -> None:
        while tally.requests_sent < total:
            job = workload.next_job()
            try:
                await job()
            except CamserveError as exc:
                tally.problems.append(f"{job.__name__}: {exc}"[:300])

    async with asyncio.timeout(TIME_LIMIT_S):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def served_model(server: ServerThread) -> Any:
    """The nn.Module the engine runs (the runtime's engine owns it)."""
    engine = server.server.registry.get("resnet18")._engine
    assert engine is not None
    return engine.model


def counters(server: ServerThread) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for metric in server.metrics.registry.collect():
        if metric.name != "camserve_requests":
            continue
        for sample in metric.samples:
            if sample.name == "camserve_requests_total":
                counts[(sample.labels["rpc"], sample.labels["code"])] = int(sample.value)
    return counts


async def test_soak_leaks_nothing_and_loses_nothing(server: ServerThread) -> None:
    async with AsyncClient(address=server.address, retry=None, timeout=60) as client:
        tops = [(await client.explain(data)).top.index for data in FILES]
        await run(client, Tally(), tops, WARMUP_REQUESTS, seed=1)
        gc.collect()
        rss_before = vm_rss_bytes()
        threads_before = threading.active_count()
        counts_before = counters(server)

        tally = Tally()
        started = time.monotonic()
        await run(client, tally, tops, SOAK_REQUESTS, seed=2)
        elapsed = time.monotonic() - started

    gc.collect()
    await asyncio.sleep(0.5)  # let channel and call threads of the closed client wind down
    rss_after = vm_rss_bytes()
    growth = (rss_after - rss_before) / rss_before
    counts = counters(server)
    delta = {key: counts[key] - counts_before.get(key, 0) for key in counts}
    print(
        f"\nsoak: {tally.requests_sent} requests ({tally.streams} streams) in {elapsed:.1f}s; "
        f"answered {tally.answered} ({tally.unary_ok + tally.stream_items_ok} ok, "
        f"{tally.unary_refused + tally.stream_items_refused} refused); RSS "
        f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB ({100 * growth:+.2f}%); "
        f"threads {threads_before} -> {threading.active_count()}; server counts {delta}"
    )

    assert not tally.problems, tally.problems[:5]
    assert tally.requests_sent >= SOAK_REQUESTS
    assert tally.answered == tally.requests_sent
    assert delta.get(("Explain", "OK"), 0) == tally.unary_ok
    refused = delta.get(("Explain", "INVALID_ARGUMENT"), 0) + delta.get(("Explain", "NOT_FOUND"), 0)
    assert refused == tally.unary_refused
    assert delta.get(("ExplainStream", "OK"), 0) == tally.streams
    assert delta.get(("ExplainStream.item", "INVALID_ARGUMENT"), 0) == tally.stream_items_refused
    assert delta.get(("ExplainStream.item", "OK"), 0) == tally.stream_items_ok
    expected_keys = {
        ("Explain", "OK"),
        ("Explain", "INVALID_ARGUMENT"),
        ("Explain", "NOT_FOUND"),
        ("ExplainStream", "OK"),
        ("ExplainStream.item", "INVALID_ARGUMENT"),
        ("ExplainStream.item", "OK"),
    }
    assert {key for key, value in delta.items() if value} <= expected_keys

    assert growth < MAX_RSS_GROWTH
    model = served_model(server)
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert threading.active_count() <= threads_before + 2
    assert server.server.registry.get("resnet18").queue_depth == 0
    assert health_status(server.address) == SERVING
