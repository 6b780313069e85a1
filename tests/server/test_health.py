"""The health policy: faults in a row turn a model failing, refusals never do, a success heals."""

from __future__ import annotations

import torch

from camserve.server import batcher
from camserve.server.engine import EngineError, LayerError, ModelFault, RowResult
from camserve.server.errors import InvalidRequest, ServerFault
from camserve.server.faults import checked_rows, is_fault, service_error
from camserve.server.health import HealthTracker

OK = ("result", 0.01)


def test_faults_in_a_row_turn_a_model_failing_and_one_success_brings_it_back() -> None:
    tracker = HealthTracker(failing_after=3)
    assert not tracker.observe([RuntimeError("cuDNN error"), ModelFault("NaN logits")])
    assert not tracker.observe([ModelFault("NaN logits")])
    assert tracker.serving
    assert tracker.observe([torch.OutOfMemoryError("CUDA out of memory")])  # the third
    assert not tracker.serving
    assert not tracker.observe([ModelFault("NaN logits")])  # still failing, no change
    assert tracker.observe([ModelFault("NaN logits"), OK])  # one row of a batch worked
    assert tracker.serving


def test_a_batch_with_one_success_resets_the_count() -> None:
    tracker = HealthTracker(failing_after=2)
    tracker.observe([ModelFault("NaN logits")])
    tracker.observe([ModelFault("NaN logits"), OK])
    assert not tracker.observe([ModelFault("NaN logits")])
    assert tracker.serving


def test_refusals_never_count_against_health() -> None:
    tracker = HealthTracker(failing_after=1)
    refusals: list[BaseException] = [
        EngineError("classes[0]: 1000 is out of range"),
        LayerError("layer 'x' does not exist"),
        batcher.DeadlineExpired(),
        batcher.QueueFull(8, 8, 0.1),
        InvalidRequest("images: no images"),
    ]
    for refusal in refusals:
        assert not is_fault(refusal)
        assert not tracker.observe([refusal])
    assert tracker.serving
    assert is_fault(ServerFault("the server failed"))
    assert tracker.observe([ModelFault("NaN logits")])


def test_faults_become_internal_without_blaming_the_request() -> None:
    fault = service_error(ModelFault("its logits for this image are NaN or Inf"), "tiny")
    assert isinstance(fault, ServerFault)
    assert "model 'tiny' failed" in fault.message
    assert "logits for this image are NaN or Inf" in fault.message
    assert "not the request's" in fault.message
    bug = service_error(KeyError("/secret/path"), "tiny")
    assert isinstance(bug, ServerFault)
    assert "KeyError" in bug.message
    assert "/secret/path" not in bug.message
    refusal = service_error(EngineError("classes[0]: 1000 is out of range"), "tiny")
    assert isinstance(refusal, InvalidRequest)


def test_forward_rows_with_non_finite_logits_fail_their_own_job_alone() -> None:
    from camserve.server.engine import CamEngine
    from camserve.server.engine.jobs import ForwardJob, run_forward
    from tests._support.faulty_model import FAULT, faulty_net

    engine = CamEngine(faulty_net())
    recorded: dict[str, torch.Tensor] = {}

    def job(name: str, pixels: torch.Tensor) -> ForwardJob:
        return ForwardJob(
            key="inputs",
            rows=2,
            cost=2,
            build=lambda: pixels,
            record=lambda logits: recorded.__setitem__(name, logits),
        )

    marked = torch.zeros(2, 3, 32, 32)
    marked[:, :, 0, :] = 1.0  # the marker the model answers with NaN logits
    good, bad = job("good", torch.zeros(2, 3, 32, 32)), job("bad", marked)
    FAULT.reset("nan-marked")
    try:
        faulted = run_forward(engine, [good, bad])  # one model call for both
    finally:
        FAULT.reset()
    assert list(faulted) == [bad]
    assert is_fault(faulted[bad])
    assert list(recorded) == ["good"]
    assert bool(torch.isfinite(recorded["good"]).all())


def _row(logits: torch.Tensor, heatmap: torch.Tensor) -> RowResult:
    return RowResult(
        logits=logits,
        probabilities=torch.softmax(logits, 0),
        classes=(0,),
        layer="features",
        maps={("gradcam", 0): heatmap},
    )


def test_a_batch_is_checked_at_once_and_only_its_non_finite_rows_fail() -> None:
    rows = [_row(torch.zeros(5), torch.ones(3, 3)) for _ in range(4)]
    checked = checked_rows(rows)
    assert all(a is b for a, b in zip(checked, rows, strict=True))  # all finite: the rows

    bad_logits = _row(torch.tensor([0.0, float("nan"), 0, 0, 0]), torch.ones(3, 3))
    bad_map = _row(torch.zeros(5), torch.full((3, 3), float("inf")))
    checked = checked_rows([rows[0], bad_logits, rows[1], bad_map])
    assert checked[0] is rows[0]
    assert checked[2] is rows[1]
    assert isinstance(checked[1], ModelFault)
    assert "logits" in str(checked[1])
    assert isinstance(checked[3], ModelFault)
    assert "activations or gradients" in str(checked[3])
    assert checked_rows([]) == []
