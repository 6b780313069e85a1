"""`camserve-loadtest`: drive a camserve server with Explain calls and report what it sustained.

Closed loop (--concurrency C): C callers, each sending its next request when the last one ends.
Open loop (--rate R): requests start on a schedule (Poisson arrivals, or --fixed-interval) whatever
the answers do, with at most --max-in-flight outstanding so a slow server cannot make the test
grow without bound; an arrival that finds no free slot waits, and its latency counts from its
scheduled start, so queueing in the client is not hidden.

The test always ends by itself (--duration is at most an hour, --requests at most a million), and
only talks to --server. Calls are not retried: refusals are counted by status code.
--connections N spreads the calls over N TCP connections (HTTP/2 balances per connection, so one
connection reaches one of a server's frontend processes); the report says how many it used.

Exit status: 0 when the test ran and some requests succeeded, 1 when the server could not be
reached or lacks the model (checked with one GetModel call before the load starts) or when no
request succeeded (a one-line reason on stderr, after the report), 2 on bad arguments, 130
when interrupted. A user's mistake never shows a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image as PILImage

from camserve.client.aio import AsyncClient
from camserve.client.commandline import FAILED, INTERRUPTED, OK, USAGE, describe_os_error
from camserve.client.errors import CamserveError

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 1024
MAX_RATE = 10_000.0
MAX_CONNECTIONS = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class LoadConfig:
    """One load test; exactly one of `concurrency` (closed loop) and `rate` (open loop) is set."""

    server: str
    images: tuple[bytes, ...]
    concurrency: int | None = 8
    rate: float | None = None
    poisson: bool = True
    max_in_flight: int = 256
    duration_s: float | None = 10.0
    requests: int | None = None
    model: str | None = None
    timeout_s: float = 30.0
    token: str | None = None
    seed: int = 0
    connections: int = 1

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("set exactly one of concurrency (closed loop) and rate (open loop)")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("set exactly one of duration_s and requests")
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be within 1..{MAX_CONCURRENCY}")
        if self.rate is not None and not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate must be within (0, {MAX_RATE:g}] requests/s")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be within (0, {MAX_DURATION_S:g}] s")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be within 1..{MAX_REQUESTS}")
        if not 1 <= self.max_in_flight <= MAX_CONCURRENCY:
            raise ValueError(f"max_in_flight must be within 1..{MAX_CONCURRENCY}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be within 1..{MAX_CONNECTIONS}")
        if not self.images:
            raise ValueError("no images to send")


@dataclass
class LoadStats:
    """What finished: latencies and batch sizes of successes, error counts by status name."""

    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def finished(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())

    def success(self, latency_s: float, batch_size: int) -> None:
        self.latencies_s.append(latency_s)
        self.batch_sizes.append(batch_size)

    def failure(self, code_name: str) -> None:
        self.errors[code_name] += 1

    def report(self, duration_s: float, *, connections: int = 1) -> dict[str, Any]:
        """The summary `--json` prints; latency and throughput count successful calls only.
        `connections`: how many TCP connections the calls were spread over."""
        ordered = sorted(self.latencies_s)
        latency = {
            name: None if not ordered else round(percentile(ordered, p) * 1000, 3)
            for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0))
        }
        return {
            "requests": self.finished,
            "errors": dict(sorted(self.errors.items())),
            "duration_s": round(duration_s, 3),
            "throughput_rps": round(len(ordered) / duration_s, 3) if duration_s > 0 else 0.0,
            "latency_ms": latency,
            "mean_batch": round(float(np.mean(self.batch_sizes)), 3) if self.batch_sizes else None,
            "connections": connections,
        }


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values: always an observed value, monotonic in p."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def synthetic_images(count: int = 16, *, seed: int = 0, size: int = 224) -> tuple[bytes, ...]:
    """Random uint8 RGB noise encoded as JPEG in memory; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return tuple(images)


def folder_images(folder: Path) -> tuple[bytes, ...]:
    """The bytes of every JPEG, PNG and WebP file directly in `folder`, by name."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return tuple(p.read_bytes() for p in paths)


class _Run:
    """The state of one running test: the budget of requests, what is in flight, the stats."""

    def __init__(self, config: LoadConfig, client: AsyncClient) -> None:
        self.config = config
        self.client = client
        self.stats = LoadStats()
        self.started = time.monotonic()
        self.issued = 0
        self.in_flight = 0

    def may_issue(self) -> bool:
        """Takes a ticket for one more request if the duration or count allows."""
        config = self.config
        if config.requests is not None and self.issued >= config.requests:
            return False
        if config.duration_s is not None and self.elapsed() >= config.duration_s:
            return False
        self.issued += 1
        return True

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def one(self, start: float) -> None:
        """One Explain call; latency from `start` (the scheduled time in the open loop)."""
        image = self.config.images[self.issued % len(self.config.images)]
        self.in_flight += 1
        try:
            result = await self.client.explain(
                image, model=self.config.model, timeout=self.config.timeout_s
            )
        except CamserveError as exc:
            self.stats.failure(exc.code.name)
        else:
            self.stats.success(time.monotonic() - start, result.batch_size)
        finally:
            self.in_flight -= 1

    async def closed_loop(self, concurrency: int) -> None:
        async def caller() -> None:
            while self.may_issue():
                await self.one(time.monotonic())

        await asyncio.gather(*(caller() for _ in range(concurrency)))

    async def open_loop(self, rate: float) -> None:
        rng = random.Random(self.config.seed)
        slots = asyncio.Semaphore(self.config.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()

        async def limited(start: float) -> None:
            try:
                await self.one(start)
            finally:
                slots.release()

        scheduled = time.monotonic()
        while True:
            await asyncio.sleep(max(scheduled - time.monotonic(), 0.0))
            if not self.may_issue():  # checked at the arrival time, so none lands past the end
                break
            await slots.acquire()
            task = asyncio.create_task(limited(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            scheduled += rng.expovariate(rate) if self.config.poisson else 1.0 / rate
        await asyncio.gather(*tasks)

    async def show_progress(self, out: TextIO) -> None:
        while True:
            await asyncio.sleep(1.0)
            elapsed = self.elapsed()
            out.write(
                f"\r{elapsed:7.1f}s  {self.stats.finished} done  "
                f"{sum(self.stats.errors.values())} errors  {self.in_flight} in flight  "
                f"{self.stats.finished / elapsed:8.1f} req/s "
            )
            out.flush()


async def run_load(config: LoadConfig, *, progress: TextIO | None = None) -> dict[str, Any]:
    """Runs the test and returns its report (see `LoadStats.report`); raises CamserveError
    before any load is sent when the server cannot be reached or does not host the model."""
    async with AsyncClient(
        address=config.server,
        token=config.token,
        timeout=config.timeout_s,
        retry=None,
        connections=config.connections,
    ) as client:
        await client.model(config.model or "")  # the server's default model when none is named
        run = _Run(config, client)
        reporter = None if progress is None else asyncio.create_task(run.show_progress(progress))
        try:
            if config.rate is not None:
                await run.open_loop(config.rate)
            elif config.concurrency is not None:
                await run.closed_loop(config.concurrency)
        finally:
            if reporter is not None and progress is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                progress.write("\n")
        return run.stats.report(run.elapsed(), connections=client.connections)


def format_report(report: dict[str, Any]) -> str:
    errors = ", ".join(f"{name} {n}" for name, n in report["errors"].items()) or "none"
    latency = report["latency_ms"]
    lines = [
        f"requests   {report['requests']} in {report['duration_s']:.2f} s (errors: {errors})",
        f"throughput {report['throughput_rps']:.1f} successful requests/s",
        f"connections {report['connections']}",
    ]
    if latency["p50"] is not None:
        lines.append(
            "latency ms p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {max:.1f}".format(
                **latency
            )
        )
        lines.append(f"mean batch {report['mean_batch']:.2f} (as reported by the server)")
    return "\n".join(lines)


def _add_load_shape(parser: argparse.ArgumentParser) -> None:
    """The options that shape the load: closed or open loop, and how long it lasts."""
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help=f"closed loop: C callers (default 8, at most {MAX_CONCURRENCY})",
    )
    loop.add_argument(
        "--rate", type=float, metavar="R", help=f"open loop: R requests/s (at most {MAX_RATE:g})"
    )
    parser.add_argument(
        "--fixed-interval",
        action="store_true",
        help="open loop: evenly spaced starts instead of Poisson arrivals",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="open loop: outstanding cap (256)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"seconds to send for (default 10, at most {MAX_DURATION_S:g})",
    )
    length.add_argument(
        "--requests", type=int, metavar="N", help=f"requests to send (at most {MAX_REQUESTS})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camserve-loadtest",
        description="Load-test a camserve server with Explain calls (no retries).",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="server to test")
    _add_load_shape(parser)
    parser.add_argument(
        "--images", type=Path, metavar="DIR", help="send these files (default: synthetic JPEGs)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        metavar="N",
        help=f"spread the calls over N TCP connections (1, at most {MAX_CONNECTIONS})",
    )
    parser.add_argument("--model", help="model name (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (30)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token")
    parser.add_argument("--seed", type=int, default=0, help="seed of images and arrivals (0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the load test; the exit status is in the module docstring."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        config = _config(args)
    except (OSError, ValueError) as exc:
        print(f"camserve-loadtest: error: {describe_os_error(exc)}", file=sys.stderr)
        return USAGE
    try:
        report = asyncio.run(run_load(config, progress=None if args.quiet else sys.stderr))
    except CamserveError as exc:
        print(
            f"camserve-loadtest: error: cannot start against {config.server}: {exc}",
            file=sys.stderr,
        )
        return FAILED
    except KeyboardInterrupt:
        print("camserve-loadtest: interrupted", file=sys.stderr)
        return INTERRUPTED
    print(json.dumps(report) if args.json else format_report(report))
    if report["requests"] and report["latency_ms"]["max"] is None:  # not one success
        errors = ", ".join(f"{code} {count}" for code, count in report["errors"].items())
        print(f"camserve-loadtest: error: no request succeeded ({errors})", file=sys.stderr)
        return FAILED
    return OK


def _config(args: argparse.Namespace) -> LoadConfig:
    """The test the arguments describe; OSError or ValueError for a bad file or value."""
    return LoadConfig(
        server=args.server,
        images=folder_images(args.images) if args.images else synthetic_images(seed=args.seed),
        concurrency=None if args.rate is not None else _given(args.concurrency, 8),
        rate=args.rate,
        poisson=not args.fixed_interval,
        max_in_flight=args.max_in_flight,
        duration_s=None if args.requests is not None else _given(args.duration, 10.0),
        requests=args.requests,
        model=args.model,
        timeout_s=args.timeout,
        token=args.token_file.read_text().strip() if args.token_file else None,
        seed=args.seed,
        connections=args.connections,
    )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value
