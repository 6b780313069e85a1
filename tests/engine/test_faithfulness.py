"""Faithfulness scores against pytorch-grad-cam, torch-cam and a plain per-image reference.

The seeded ResNet-18's classifier is scaled by 5 so its probabilities spread over (0, 1) (about
0.65 / 0.15 / 0.05 for the top three): with near-uniform probabilities every change would be
below the tolerances and the comparisons would prove nothing.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam.metrics.cam_mult_image import (
    CamMultImageConfidenceChange,
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

from camserve.server.engine import CamEngine, EngineError, ModelFault, RowRequest
from camserve.server.engine.faithfulness import MAX_STEPS, SCORES, saliency_ranks
from camserve.server.engine.scoring import (
    MapScores,
    ScorePlan,
    forward_rows,
    plan_from_results,
    run_scores,
)

SIZE = (80, 80)  # 6400 pixels: 20 steps of 320, so torch-cam's schedule is the same as ours


@pytest.fixture(scope="module")
def confident_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        model.fc.weight.mul_(5)
        model.fc.bias.mul_(5)
    return model


@pytest.fixture
def engine(confident_resnet18: nn.Module, make_engine: Callable[..., CamEngine]) -> CamEngine:
    return make_engine(confident_resnet18)


def _explain(engine: CamEngine, batch: torch.Tensor, methods: tuple[str, ...], top_k: int) -> Any:
    return engine.explain_batch(batch, [RowRequest("layer4", methods, top_k=top_k)] * len(batch))


class FixedCams:
    """A torch-cam CAM extractor that hands back given maps, so its metrics score our maps."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model = model
        self.maps = maps

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [self.maps]

    def fuse_cams(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return cams[0]

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        yield


# --------------------------------------------------------------------- confidence change


def test_confidence_change_matches_pytorch_grad_cam_and_torch_cam(
    engine: CamEngine,
    confident_resnet18: nn.Module,
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(3, SIZE, seed=7)
    methods = ("gradcam", "gradcampp", "layercam")
    results = _explain(engine, batch, methods, top_k=2)
    plan, keys = plan_from_results(batch, results, ("confidence_change",))
    assert plan.rows == len(keys) == 3 * 3 * 2
    scores = dict(zip(keys, run_scores(plan, engine.predict, max_rows=8), strict=True))
    maps = dict(zip(keys, plan.maps, strict=True))  # the normalised maps the plan scored

    largest = 0.0
    for method in methods:
        for slot in range(2):
            picked = [(i, method, r.classes[slot]) for i, r in enumerate(results)]
            cams = torch.stack([maps[key] for key in picked])
            ours = [scores[key] for key in picked]
            absolute = np.array([s.masked_probability - s.probability for s in ours])
            targets = [ClassifierOutputSoftmaxTarget(key[2]) for key in picked]
            where = f"{method}, slot {slot}"

            expected = CamMultImageConfidenceChange()(
                batch, cams.numpy(), targets, confident_resnet18
            )
            np.testing.assert_allclose(absolute, expected, atol=1e-5, err_msg=where)
            relative = np.array([s.confidence_change for s in ours])
            probability = np.array([s.probability for s in ours])
            np.testing.assert_allclose(relative * probability, expected, atol=1e-5, err_msg=where)
            drop = DropInConfidence()(batch, cams.numpy(), targets, confident_resnet18)
            np.testing.assert_allclose(np.maximum(-absolute, 0), drop, atol=1e-5, err_msg=where)
            increase = IncreaseInConfidence()(batch, cams.numpy(), targets, confident_resnet18)
            np.testing.assert_array_equal((relative > 0).astype(np.float32), increase, where)
            largest = max(largest, float(np.abs(expected).max()))

            # torch-cam's average drop is max(p - p_masked, 0) / (p + 1e-7), averaged.
            metric = ClassificationMetric(
                FixedCams(confident_resnet18, cams), lambda x: torch.softmax(x, dim=-1)
            )
            metric.update(batch, class_idx=[key[2] for key in picked])
            summary = metric.summary()
            drops = np.maximum(-relative, 0) * probability / (probability + 1e-7)
            assert summary["avg_drop"] == pytest.approx(drops.mean(), abs=1e-5), where
            assert summary["conf_increase"] == pytest.approx((relative > 0).mean()), where
    assert largest > 0.05  # the comparisons above are not vacuous


def test_tiny_probabilities_keep_a_finite_relative_change(engine: CamEngine) -> None:
    """A class far below float32's smallest probability still gets an exact relative change."""
    batch = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    logits = engine.predict(batch)
    lowest = int(logits[0].argmin())
    huge = logits.clone()
    huge[0, 0] += 200.0  # every other class's probability underflows to 0 in float32
    assert float(torch.softmax(huge, dim=1)[0, lowest]) == 0.0
    plan = ScorePlan(
        batch,
        torch.ones(1, *SIZE),
        image_index=[0],
        classes=[lowest],
        logits=huge,
        scores=("confidence_change",),
    )
    (result,) = run_scores(plan, engine.predict)
    expected = torch.expm1(
        torch.log_softmax(logits.double(), 1)[0, lowest]
        - torch.log_softmax(huge.double(), 1)[0, lowest]
    )
    assert result.confidence_change is not None
    assert np.isfinite(result.confidence_change)
    assert result.confidence_change == pytest.approx(float(expected), rel=1e-4)


# ------------------------------------------------------------------ deletion and insertion


def reference_curves(
    model: nn.Module, image: torch.Tensor, cam: torch.Tensor, class_index: int, steps: int
) -> tuple[list[float], list[float], list[float]]:
    """Deletion and insertion, one image at a time: fractions and both probability curves.

    Pixels ranked by (-saliency, pixel index); step k perturbs the first floor(k * P / S) of
    them; the baseline is zero in normalised space.
    """
    pixels = cam.numel()
    values = cam.flatten().tolist()
    order = sorted(range(pixels), key=lambda i: (-values[i], i))
    flat = image.flatten(1)
    deleted, inserted, fractions = [], [], []
    for k in range(steps + 1):
        count = k * pixels // steps
        top = torch.tensor(order[:count], dtype=torch.int64)
        deletion = flat.clone()
        deletion[:, top] = 0.0
        insertion = torch.zeros_like(flat)
        insertion[:, top] = flat[:, top]
        deleted.append(deletion.view_as(image))
        inserted.append(insertion.view_as(image))
        fractions.append(count / pixels)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.stack(deleted + inserted)), dim=1)
    curve = probabilities[:, class_index].double().tolist()
    return fractions, curve[: steps + 1], curve[steps + 1 :]


def trapezoid(fractions: list[float], curve: list[float]) -> float:
    return sum(
        (fractions[k + 1] - fractions[k]) * (curve[k] + curve[k + 1]) / 2
        for k in range(len(curve) - 1)
    )


def _assert_curves_match(
    scores: MapScores,
    model: nn.Module,
    image: torch.Tensor,
    cam: torch.Tensor,
    key: Any,
    steps: int,
) -> None:
    fractions, deletion, insertion = reference_curves(model, image, cam, key[2], steps)
    assert scores.deletion is not None
    assert scores.insertion is not None
    assert len(scores.deletion.probabilities) == len(scores.insertion.probabilities) == steps + 1
    np.testing.assert_allclose(scores.deletion.fractions, fractions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores.deletion.probabilities, deletion, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(scores.insertion.probabilities, insertion, atol=1e-5, err_msg=key)
    assert scores.deletion.auc == pytest.approx(trapezoid(fractions, deletion), abs=1e-5)
    assert scores.insertion.auc == pytest.approx(trapezoid(fractions, insertion), abs=1e-5)


@pytest.mark.parametrize(
    ("size", "steps"),
    [
        pytest.param(SIZE, 20, id="80x80-20-steps"),
        pytest.param((75, 77), 7, id="75x77-7-uneven-steps"),
    ],
)
def test_deletion_and_insertion_match_a_per_image_reference(
    engine: CamEngine,
    confident_resnet18: nn.Module,
    random_images: Callable[..., torch.Tensor],
    size: tuple[int, int],
    steps: int,
) -> None:
    batch = random_images(2, size, seed=11)
    results = _explain(engine, batch, ("gradcam", "hirescam"), top_k=1)
    plan, keys = plan_from_results(batch, results, ("deletion_auc", "insertion_auc"), steps=steps)
    scored = run_scores(plan, engine.predict, max_rows=16)
    for key, scores, cam in zip(keys, scored, plan.maps, strict=True):
        _assert_curves_match(scores, confident_resnet18, batch[key[0]], cam, key, steps)


def test_ties_break_by_pixel_index(
    engine: CamEngine,
    confident_resnet18: nn.Module,
    random_images: Callable[..., torch.Tensor],
) -> None:
    """Constant and few-level maps: whole regions tie, and pixel order decides."""
    batch = random_images(1, SIZE, seed=5)
    levels = torch.randint(0, 3, (1, *SIZE), generator=torch.Generator().manual_seed(2)) / 2
    cams = torch.cat([torch.zeros(1, *SIZE), torch.ones(1, *SIZE), levels])
    assert torch.equal(saliency_ranks(cams[:1]), torch.arange(SIZE[0] * SIZE[1])[None])
    logits = engine.predict(batch)
    plan = ScorePlan(
        batch,
        cams,
        image_index=[0, 0, 0],
        classes=[381, 238, 76],
        logits=logits,
        scores=("deletion_auc", "insertion_auc"),
        steps=10,
    )
    for m, scores in enumerate(run_scores(plan, engine.predict)):
        key = (0, "levels", [381, 238, 76][m])
        _assert_curves_match(scores, confident_resnet18, batch[0], cams[m], key, 10)


def test_deletion_and_insertion_match_torch_cam(
    engine: CamEngine,
    confident_resnet18: nn.Module,
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(3, SIZE, seed=13)
    results = _explain(engine, batch, ("gradcam",), top_k=1)
    plan, keys = plan_from_results(batch, results, ("deletion_auc", "insertion_auc"))
    scored = run_scores(plan, engine.predict, max_rows=64)
    for key, scores, cam in zip(keys, scored, plan.maps, strict=True):
        metric = DeletionInsertionMetric(
            FixedCams(confident_resnet18, cam[None]),
            lambda x: torch.softmax(x, dim=-1),
            steps=20,
        )
        metric.update(batch[key[0] : key[0] + 1], class_idx=[key[2]])
        summary = metric.summary()
        assert scores.deletion_auc == pytest.approx(summary["deletion_auc"], abs=1e-5)
        assert scores.insertion_auc == pytest.approx(summary["insertion_auc"], abs=1e-5)


def test_curve_ends_are_the_image_and_the_baseline(
    engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(2, SIZE, seed=17)
    results = _explain(engine, batch, ("gradcam",), top_k=2)
    plan, keys = plan_from_results(batch, results, SCORES, steps=4)
    baseline = torch.softmax(engine.predict(torch.zeros(1, 3, *SIZE)).double(), dim=1)[0]
    for (image, _, class_index), scores in zip(keys, run_scores(plan, engine.predict), strict=True):
        assert scores.deletion is not None
        assert scores.insertion is not None
        original = float(results[image].probabilities[class_index])
        assert scores.probability == pytest.approx(original, abs=1e-6)
        assert scores.deletion.fractions == (0.0, 0.25, 0.5, 0.75, 1.0)
        assert scores.deletion.probabilities[0] == scores.insertion.probabilities[-1]
        assert scores.deletion.probabilities[0] == scores.probability
        assert scores.deletion.probabilities[-1] == scores.insertion.probabilities[0]
        assert scores.insertion.probabilities[0] == pytest.approx(
            float(baseline[class_index]), abs=1e-6
        )
        assert set(scores.values()) == set(SCORES)


# --------------------------------------------------------------------- chunks and batching


def _summary(scores: list[MapScores]) -> torch.Tensor:
    rows = []
    for s in scores:
        assert s.deletion is not None
        assert s.insertion is not None
        assert s.confidence_change is not None
        rows.append([s.confidence_change, *s.deletion.probabilities, *s.insertion.probabilities])
    return torch.tensor(rows, dtype=torch.float64)


def test_results_do_not_depend_on_chunks_or_on_rows_batched_alongside(
    engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(3, SIZE, seed=19)
    results = _explain(engine, batch, ("gradcam", "layercam"), top_k=1)

    def plan() -> tuple[ScorePlan, list[Any]]:
        return plan_from_results(batch, results, SCORES, steps=5)

    whole, keys = plan()
    expected = _summary(run_scores(whole, engine.predict, max_rows=whole.rows))
    for max_rows in (1, 7):
        found = _summary(run_scores(plan()[0], engine.predict, max_rows=max_rows))
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)

    # Chunks recorded out of order, each sharing its forward pass with another plan's rows.
    mine, _ = plan()
    other_batch = random_images(2, SIZE, seed=23)
    other, _ = plan_from_results(
        other_batch, _explain(engine, other_batch, ("hirescam",), top_k=2), SCORES, steps=9
    )
    theirs = other.chunks(6)
    for index, chunk in enumerate(reversed(mine.chunks(5))):
        partner = theirs[index % len(theirs)]
        images = torch.cat([other.build(partner), mine.build(chunk)])
        logits = engine.predict(images)
        mine.record(chunk, logits[len(partner) :])
    torch.testing.assert_close(_summary(mine.results()), expected, atol=1e-5, rtol=0)

    # The first image's maps scored on their own.
    alone, alone_keys = plan_from_results(batch[:1], results[:1], SCORES, steps=5)
    assert alone_keys == keys[:2]
    found = _summary(run_scores(alone, engine.predict))
    torch.testing.assert_close(found, expected[:2], atol=1e-5, rtol=0)


def test_row_counts_and_built_rows(
    engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(2, SIZE, seed=29)
    results = _explain(engine, batch, ("gradcam", "xgradcam"), top_k=2)
    cases = {
        ("confidence_change",): 8,
        ("deletion_auc",): 8 * 19 + 1,
        ("insertion_auc", "deletion_auc"): 8 * 38 + 1,
        SCORES: 8 * 39 + 1,
    }
    for scores, rows in cases.items():
        plan, keys = plan_from_results(batch, results, scores)
        assert len(keys) == 8
        assert plan.rows == forward_rows(scores, 8) == rows
        assert sum(len(chunk) for chunk in plan.chunks(10)) == rows
    assert forward_rows(SCORES, 0) == 0
    assert forward_rows(("deletion_auc",), 3, steps=1) == 1

    plan, _ = plan_from_results(batch, results, SCORES, steps=3)
    built = plan.build(range(0, plan.rows))
    assert not built.requires_grad
    assert built.shape == (plan.rows, 3, *SIZE)
    assert torch.count_nonzero(built[0]) == 0  # the shared baseline row
    image = batch[0]
    cam = plan.maps[0]
    torch.testing.assert_close(built[1], image * cam, atol=0, rtol=0)  # map 0's masked image
    # Map 0's first deletion step removes its 2133 most salient pixels (floor(6400 / 3)).
    kept = built[2].flatten(1) == image.flatten(1)
    removed = (~kept).all(dim=0)
    assert int(removed.sum()) == 6400 // 3
    assert bool(cam.flatten()[removed].min() >= cam.flatten()[~removed].max())


# ------------------------------------------------------------------------------ errors


def test_bad_arguments_name_the_argument_and_the_fix(
    engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(1, SIZE)
    logits = engine.predict(batch)
    cams = torch.rand(1, *SIZE)

    def make(**changes: Any) -> ScorePlan:
        arguments: dict[str, Any] = {
            "image_index": [0],
            "classes": [1],
            "logits": logits,
            "scores": SCORES,
        }
        arguments.update(changes)
        return ScorePlan(arguments.pop("images", batch), arguments.pop("maps", cams), **arguments)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"scores": ("road",)}, "unknown score 'road'"),
        ({"scores": "deletion_auc"}, "scores must be a non-empty tuple"),
        ({"scores": ()}, "scores must be a non-empty tuple"),
        ({"scores": ("deletion_auc", "deletion_auc")}, "lists a score twice"),
        ({"steps": 0}, f"steps must be an int from 1 to {MAX_STEPS}"),
        ({"steps": MAX_STEPS + 1}, f"steps must be an int from 1 to {MAX_STEPS}"),
        ({"steps": True}, "steps must be an int"),
        ({"maps": cams * 2}, "maps must be normalised to [0, 1]"),
        ({"maps": cams[:, :40]}, "bring them there with shaping.to_input"),
        ({"image_index": [1]}, "image_index[0] must be an image index in 0..0"),
        ({"image_index": [0, 0]}, "image_index has 2 entries but there are 1 maps"),
        ({"classes": [1000]}, "classes[0] must be a class index in 0..999"),
        ({"logits": logits[0]}, "logits must be (N, num_classes)"),
        ({"images": batch[0]}, "images must be (N, C, H, W)"),
    ]
    for changes, message in cases:
        with pytest.raises(EngineError, match=re.escape(message)):
            make(**changes)
    # Non-finite maps come from the model (its activations or gradients), not from the caller.
    with pytest.raises(ModelFault, match="NaN or Inf"):
        make(maps=torch.full((1, *SIZE), float("nan")))
    with pytest.raises(EngineError, match="use at most 4 steps"):
        ScorePlan(
            batch[:, :, :2, :2],
            cams[:, :2, :2],
            image_index=[0],
            classes=[1],
            logits=logits,
            scores=("deletion_auc",),
            steps=5,
        )

    plan = make(steps=2)
    with pytest.raises(EngineError, match="max_rows must be an int >= 1"):
        plan.chunks(0)
    with pytest.raises(EngineError, match="reaches past the plan's"):
        plan.build(range(0, plan.rows + 1))
    with pytest.raises(EngineError, match="non-empty range"):
        plan.build(range(2, 2))
    with pytest.raises(EngineError, match="have no logits yet"):
        plan.results()
    rows = range(0, plan.rows)
    with pytest.raises(EngineError, match=r"must have shape \(4, 1000\)"):
        plan.record(rows, logits)
    plan.record(rows, engine.predict(plan.build(rows)))
    with pytest.raises(EngineError, match="record each chunk once"):
        plan.record(range(1, 2), logits)
    assert plan.complete
    with pytest.raises(EngineError, match="num_maps must be an int >= 0"):
        forward_rows(SCORES, -1)


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_rows_match_the_cpu(
    confident_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    batch = random_images(2, SIZE, seed=31)
    cpu = make_engine(confident_resnet18)
    results = _explain(cpu, batch, ("gradcam",), top_k=2)
    on_cpu, _ = plan_from_results(batch, results, SCORES, steps=5)
    on_cuda, _ = plan_from_results(batch, results, SCORES, steps=5, device="cuda")
    assert on_cuda.build(range(0, 3)).is_cuda
    expected = _summary(run_scores(on_cpu, cpu.predict))
    cuda = make_engine(copy.deepcopy(confident_resnet18), device="cuda")
    # cuDNN convolutions may use TF32 in float32: probabilities agree to about 1e-3.
    found = _summary(run_scores(on_cuda, cuda.predict))
    torch.testing.assert_close(found, expected, atol=2e-3, rtol=0)
