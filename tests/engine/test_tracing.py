"""torch.fx tracing never overlaps a model call in another thread (it patches Module.__call__
for the whole process): two hosted models, one splitting its network while the other serves."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torchvision

from camserve.server.engine import CamEngine, RowRequest
from camserve.server.engine.tracing import ModelCallGuard


def test_a_trace_waits_for_model_calls_and_holds_new_ones_back() -> None:
    guard = ModelCallGuard()
    events: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def call() -> None:
        with guard.running():
            inside.set()
            release.wait(5)
            events.append("call done")

    caller = threading.Thread(target=call)
    caller.start()
    inside.wait(5)

    def trace() -> None:
        with guard.tracing():
            events.append("traced")

    tracer = threading.Thread(target=trace)
    tracer.start()
    with guard.condition:
        assert guard.condition.wait_for(lambda: guard.waiting_traces == 1, timeout=5)
    assert events == []  # the trace waits for the call in progress
    release.set()
    caller.join(5)
    tracer.join(5)
    assert events == ["call done", "traced"]


def test_a_thread_running_a_model_may_trace_and_nest_calls() -> None:
    guard = ModelCallGuard()
    with guard.running(), guard.running(), guard.tracing():  # no deadlock on itself
        pass
    with guard.tracing():  # and the guard is free again
        pass


def test_a_model_serving_while_another_is_split_never_fails(
    make_engine: Callable[..., CamEngine], random_images: Callable[..., torch.Tensor]
) -> None:
    torch.manual_seed(0)
    serving = make_engine(torchvision.models.resnet18(num_classes=10))
    splitting = make_engine(torchvision.models.resnet18(num_classes=10))
    batch = random_images(2, (64, 64))
    failures: list[BaseException] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                serving.explain_batch(batch, [RowRequest("layer4")] * 2)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for side in (64, 96, 128, 160):  # each new input size traces the split again
            splitting.tail_fraction("layer4", (side, side))
    finally:
        done.set()
        server.join(30)
    assert not failures, failures[:1]


def test_counting_flops_holds_model_calls_back_like_a_trace(monkeypatch) -> None:
    from camserve.server.engine import tail
    from camserve.server.engine.tracing import MODEL_CALLS

    seen: list[bool] = []

    class Recording(tail.FlopCounterMode):
        def __enter__(self):  # type: ignore[no-untyped-def]
            seen.append(MODEL_CALLS._tracing)  # the counter's hooks go in under the guard
            return super().__enter__()

    monkeypatch.setattr(tail, "FlopCounterMode", Recording)
    layer = torch.nn.Linear(4, 4)
    assert tail.count_flops(lambda: layer(torch.zeros(2, 4))) == 2 * 2 * 4 * 4
    assert seen == [True]
