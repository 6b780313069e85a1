"""Keeps torch.fx tracing apart from every model call in the process.

`torch.fx.Tracer.trace` patches `torch.nn.Module.__call__` for the whole process while it runs,
so a model running in another thread meanwhile (another hosted model's batch) has its module
calls routed into the tracer and fails ("module is not installed as a submodule"). Engines run
their models inside `MODEL_CALLS.running()`; `MODEL_CALLS.tracing()` waits until no other thread
runs a model, holds new ones back while it traces, and lets them go again. A thread that runs a
model and then traces (an engine splitting its own model) does not wait for itself, and a
waiting trace goes first, so traces are not starved by a steady stream of model calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ModelCallGuard:
    """A readers-writer lock: model calls share it, a trace holds it alone."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0  # model calls in progress, over all threads, nested ones counted
        self._tracing = False
        self._waiting = 0  # traces waiting for the model calls to end
        self._mine = threading.local()

    @property
    def waiting_traces(self) -> int:
        """Traces waiting for model calls to end (read under `condition` to wait for a value)."""
        return self._waiting

    @property
    def condition(self) -> threading.Condition:
        return self._condition

    def _own(self) -> int:
        return int(getattr(self._mine, "count", 0))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Holds back traces while this thread runs a model (re-entrant)."""
        with self._condition:
            if not self._own():  # a nested call proceeds: its thread already holds a share
                while self._tracing or self._waiting:
                    self._condition.wait()
            self._running += 1
            self._mine.count = self._own() + 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._mine.count = self._own() - 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Waits until no other thread runs a model, then traces alone."""
        with self._condition:
            own = self._own()
            self._running -= own  # this thread's own calls are paused while it traces
            self._waiting += 1
            self._condition.notify_all()  # observers of `waiting_traces`
            while self._tracing or self._running:
                self._condition.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._condition:
                self._tracing = False
                self._running += own
                self._condition.notify_all()


MODEL_CALLS = ModelCallGuard()
