"""Prometheus metrics, one registry per server so several servers can share a process.

Each fact is recorded once, in one layer: per call and per stream item by the observability
interceptor (counts by status, and each answered request's stage times from its `Timing`);
per batch by the model runtime (batch size, compute time, images, queue depth, expiries); per
stage of the serving path, the CPU time of the thread doing it (`cpu_time`), which says where
the server's cores go when the model itself is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Times a stage of the serving path: `with timed("decode"): ...` (see `Metrics.cpu_time`).
StageClock = Callable[[str], AbstractContextManager[None]]


def untimed(stage: str) -> AbstractContextManager[None]:
    """A StageClock that records nothing."""
    return contextlib.nullcontext()


class _CpuTime:
    """The block's thread CPU time, added to a counter on exit."""

    __slots__ = ("_counter", "_started")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self._counter.inc(time.thread_time() - self._started)


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Metrics:
    """The server's instruments; names are stable and documented in README."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "camserve_requests",
            "RPCs answered, by RPC and status code; ExplainStream.item counts stream requests",
            ["rpc", "code"],
            registry=r,
        )
        self.images = Counter(
            "camserve_images", "Images explained (computed by the engine)", ["model"], registry=r
        )
        self.expired = Counter(
            "camserve_expired_items",
            "Images dropped unprocessed because their deadline passed in the queue",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "camserve_batch_size",
            "Images per engine batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "camserve_latency_seconds",
            "Per answered request, time per stage: queue, preprocess, compute, total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "camserve_batch_seconds",
            "Per engine batch, the time its forward, backward and CAM arithmetic took",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_cpu = Counter(
            "camserve_stage_cpu_seconds",
            "CPU time of the threads serving each stage: decode, preprocess, compute, shape, "
            "overlay, respond",
            ["model", "stage"],
            registry=r,
        )
        self._stage_children: dict[tuple[str, str], Counter] = {}
        self._add_gauges()

    def cpu_time(self, model: str, stage: str) -> AbstractContextManager[None]:
        """Adds the calling thread's CPU time inside the block to `stage` (time.thread_time:
        waits for the GIL or for I/O are not counted)."""
        key = (model, stage)
        child = self._stage_children.get(key)
        if child is None:  # labels() takes a lock and a lookup: once per stage, not per call
            child = self._stage_children[key] = self.stage_cpu.labels(model, stage)
        return _CpuTime(child)

    def _add_gauges(self) -> None:
        """Gauges; with several processes (multiprocess mode) one series per live process."""
        r = self.registry
        self.queue_depth = Gauge(
            "camserve_queue_depth",
            "Images waiting for a batch",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_ready = Gauge(
            "camserve_model_ready",
            "1 when the model is loaded and serving",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.gpu_memory = Gauge(
            "camserve_gpu_memory_bytes",
            "CUDA memory allocated by torch",
            ["device"],
            registry=r,
            multiprocess_mode="liveall",
        )
        # One series per process of the multi-process layout (role: engine or frontend).
        self.process_cpu = Gauge(
            "camserve_process_cpu_seconds",
            "CPU time used so far by each process of the server",
            ["role", "index"],
            registry=r,
            multiprocess_mode="liveall",
        )

    def sample_process(self, role: str, index: str, cuda: bool = False) -> None:
        """Records this process's CPU time (and CUDA memory): called periodically by each
        process of the multi-process layout, whose gauges cannot be read at scrape time."""
        times = os.times()
        self.process_cpu.labels(role, index).set(times.user + times.system)
        if cuda:
            import torch

            for device in range(torch.cuda.device_count()):
                self.gpu_memory.labels(f"cuda:{device}").set(torch.cuda.memory_allocated(device))

    def watch_cuda_memory(self) -> None:
        """Reports torch's allocated CUDA memory per device at each scrape."""
        import torch

        for index in range(torch.cuda.device_count()):
            allocated = functools.partial(torch.cuda.memory_allocated, index)
            self.gpu_memory.labels(f"cuda:{index}").set_function(allocated)

    def observe_timing(self, timing: Any) -> None:
        """One answered request's stages, from the `Timing` of its ExplainResponse."""
        for stage in ("queue", "preprocess", "compute", "total"):
            self.latency.labels(stage).observe(getattr(timing, f"{stage}_ms") / 1000.0)

    def observe_batch(self, model: str, size: int, depth: int) -> None:
        self.batch_size.labels(model).observe(size)
        self.queue_depth.labels(model).set(depth)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serves /metrics over HTTP on a daemon thread; `server_port` tells the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
