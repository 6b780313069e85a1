"""Rows with their input gradient run in passes of a bounded size, packed full, in any grouping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from camserve.server.engine import CamEngine, RowRequest
from camserve.server.engine.gradient_rows import GradientPlan, SaliencyParams, run_gradient_jobs
from camserve.server.engine.types import attribution_kind
from camserve.server.work import ImageJob, passes


def job(*methods: str) -> ImageJob:
    return ImageJob(torch.zeros(3, 8, 8, dtype=torch.uint8), RowRequest("features", methods))


def test_image_jobs_with_an_input_gradient_run_apart_in_bounded_passes() -> None:
    jobs = [job("gradcam"), job("saliency"), job("guided_gradcam", "gradcam"), job("eigencam")]
    jobs += [job("input_x_gradient"), job("saliency")]
    assert passes(jobs, 2) == [[0, 3], [1, 2], [4, 5]]
    assert passes(jobs, 5) == [[0, 3], [1, 2, 4, 5]]
    assert [j.cost for j in jobs[:3]] == [1, 2, 2]  # a row with its input gradient: 2 passes


def test_gradient_jobs_are_packed_into_full_passes_and_give_the_same_maps(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """3 images x 5 copies = 15 rows in passes of 4: 4, 4, 4, 3, whatever the jobs' sizes; the
    maps equal those of one pass per image."""
    engine = make_engine(seeded_tiny)
    images = random_images(3, (32, 32))
    rows = [RowRequest("block", keep_activations=True, classes=(c,)) for c in (1, 2, 3)]
    explained = engine.explain_batch(images, rows)
    params = SaliencyParams(samples=5, seed=3)
    sizes: list[int] = []
    original = engine.explain_batch

    def counted(batch: torch.Tensor, batch_rows: list[RowRequest]) -> list:
        sizes.append(int(batch.shape[0]))
        return original(batch, batch_rows)

    engine.explain_batch = counted  # type: ignore[method-assign]
    plan = GradientPlan(explained, [("smoothgrad",)] * 3, params, raw=True, chunk=3)
    assert plan.cost() == 2 * 15
    assert not run_gradient_jobs(engine, plan.jobs(), max_rows=4)
    packed = plan.finish()
    assert sizes == [4, 4, 4, 3]
    one_pass = GradientPlan(explained, [("smoothgrad",)] * 3, params, raw=True, chunk=5)
    assert not run_gradient_jobs(engine, one_pass.jobs(), max_rows=5)
    for a, b in zip(packed, one_pass.finish(), strict=True):
        kind = attribution_kind("smoothgrad")
        torch.testing.assert_close(a.outputs[kind], b.outputs[kind], rtol=1e-5, atol=1e-7)
        assert a.maps.keys() == b.maps.keys()
