"""Request checking for the methods, smoothing options and faithfulness scores: every refusal is
INVALID_ARGUMENT (a RequestError) whose message starts with the field and says how to fix it."""

from __future__ import annotations

from typing import Any

import pytest

from camserve.server.engine.registry import REGISTRY
from camserve.server.engine.shaping import Geometry
from camserve.server.engine.types import LayerSpec
from camserve.server.errors import InvalidRequest
from camserve.server.records import InputRecipe, MethodInfo, ModelMeta
from camserve.server.settings import LimitsSettings
from camserve.server.validation import (
    RESPONSE_OVERHEAD,
    ExplainPlan,
    RequestBudget,
    RequestError,
    check_response_size,
    validate,
)
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME

LIMITS = LimitsSettings()


METHOD_INFO = tuple(
    MethodInfo(
        m.name,
        1,
        1.0,
        m.layouts,
        m.rows is not None,
        m.runs_tail,
        pixel=m.pixel is not None,
        input_gradient=bool(m.input_gradient),
        gradient_rows=m.pixel.path if m.pixel is not None else "",
    )
    for m in REGISTRY
)


def meta(crop: int = 32, layers: tuple[LayerSpec, ...] | None = None) -> ModelMeta:
    return ModelMeta(
        name="tiny",
        version="1",
        device="cpu",
        num_classes=10,
        labels=tuple(f"class_{i}" for i in range(10)),
        default_layer="features",
        layers=layers or (LayerSpec("features", (16, 8, 8)),),
        recipe=InputRecipe(resize=0, crop=crop, mean=(0.5,) * 3, std=(0.5,) * 3),
        max_batch_size=8,
        methods=METHOD_INFO,
    )


def request(**output: Any) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[pb.Image(encoded=b"x")], output=pb.OutputOptions(**output))


def plan_of(message: pb.ExplainRequest, limits: LimitsSettings = LIMITS, crop: int = 32):
    return validate(message, meta(crop), limits)


def refusal(message: pb.ExplainRequest, limits: LimitsSettings = LIMITS, crop: int = 32) -> str:
    with pytest.raises(RequestError) as refused:
        plan_of(message, limits, crop)
    assert isinstance(refused.value, InvalidRequest)  # INVALID_ARGUMENT on the wire
    return str(refused.value)


def test_every_method_is_accepted_in_request_order_without_repeats() -> None:
    values = [*reversed(METHOD_BY_NAME.values()), pb.METHOD_SCORECAM]
    message = pb.ExplainRequest(images=[pb.Image(encoded=b"x")], methods=values)
    assert plan_of(message).methods == tuple(reversed(METHOD_BY_NAME))


def test_an_unknown_method_is_refused_listing_every_method() -> None:
    message = pb.ExplainRequest(images=[pb.Image(encoded=b"x")], methods=[1, 42])
    text = refusal(message)
    assert text.startswith("methods[1]: unknown method 42; use one of METHOD_GRADCAM=1")
    assert "METHOD_EIGENCAM=7" in text
    assert text.endswith("METHOD_GUIDED_GRADCAM=16")


def test_smoothing_options_reach_the_plan() -> None:
    plain = plan_of(request())
    assert (plain.eigen_smooth, plain.aug_smooth) == (False, False)
    message = request(resolution=pb.RESOLUTION_INPUT)
    message.eigen_smooth = message.aug_smooth = True
    smoothed = plan_of(message)
    assert (smoothed.eigen_smooth, smoothed.aug_smooth) == (True, True)


def test_aug_smooth_refuses_feature_map_resolution_naming_the_alternatives() -> None:
    message = request(resolution=pb.RESOLUTION_FEATURE_MAP)
    message.aug_smooth = True
    text = refusal(message)
    assert text.startswith("aug_smooth: cannot be combined with output.resolution")
    assert "averaged at input resolution" in text
    assert "RESOLUTION_INPUT, RESOLUTION_ORIGINAL or RESOLUTION_EXPLICIT" in text
    message.eigen_smooth, message.aug_smooth = True, False
    assert plan_of(message).eigen_smooth  # eigen_smooth works at any resolution


def test_no_scores_by_default() -> None:
    plan = plan_of(request())
    assert (plan.scores, plan.score_steps, plan.score_curves) == ((), 20, False)


def test_scores_become_engine_names_once_each_in_request_order() -> None:
    scores = [pb.SCORE_INSERTION_AUC, pb.SCORE_CONFIDENCE_CHANGE, pb.SCORE_INSERTION_AUC]
    plan = plan_of(request(scores=scores))
    assert plan.scores == ("insertion_auc", "confidence_change")
    assert plan.score_steps == 20  # 0 asks for the default


@pytest.mark.parametrize("value", [pb.SCORE_UNSPECIFIED, 4, 99])
def test_an_unknown_score_is_refused_naming_its_index(value: int) -> None:
    text = refusal(request(scores=[pb.SCORE_DELETION_AUC, value]))
    assert text.startswith(f"output.scores[1]: unknown score {value}; use one of ")
    assert text.endswith("SCORE_CONFIDENCE_CHANGE=1, SCORE_DELETION_AUC=2, SCORE_INSERTION_AUC=3")


def test_score_steps_within_the_limit_are_kept() -> None:
    plan = plan_of(request(scores=[pb.SCORE_DELETION_AUC], score_steps=7))
    assert plan.score_steps == 7
    assert plan_of(request(scores=[pb.SCORE_INSERTION_AUC], score_steps=100)).score_steps == 100


def test_score_steps_above_the_limit_are_refused() -> None:
    text = refusal(request(scores=[pb.SCORE_DELETION_AUC], score_steps=101))
    assert text.startswith("output.score_steps: 101 is outside 1..100")
    assert "or 0 for the default 20" in text
    tight = LimitsSettings(max_score_steps=10)
    assert plan_of(request(scores=[pb.SCORE_DELETION_AUC], score_steps=10), tight)
    text = refusal(request(scores=[pb.SCORE_DELETION_AUC], score_steps=11), tight)
    assert text.startswith("output.score_steps: 11 is outside 1..10")


def test_score_steps_never_exceed_the_input_pixels() -> None:
    # A 4x4 input has 16 pixels: a curve cannot have more steps than pixels to perturb.
    assert plan_of(request(scores=[pb.SCORE_DELETION_AUC], score_steps=16), crop=4)
    text = refusal(request(scores=[pb.SCORE_DELETION_AUC], score_steps=17), crop=4)
    assert text.startswith("output.score_steps: 17 is outside 1..16")


@pytest.mark.parametrize("scores", [[], [pb.SCORE_CONFIDENCE_CHANGE]])
def test_score_steps_without_a_curve_score_are_refused(scores: list[int]) -> None:
    text = refusal(request(scores=scores, score_steps=10))
    assert text.startswith("output.score_steps: steps only apply to the deletion and insertion")
    assert "add SCORE_DELETION_AUC or SCORE_INSERTION_AUC to output.scores, or leave it 0" in text


@pytest.mark.parametrize("scores", [[], [pb.SCORE_CONFIDENCE_CHANGE]])
def test_score_curves_without_a_curve_score_are_refused(scores: list[int]) -> None:
    text = refusal(request(scores=scores, score_curves=True))
    assert text.startswith("output.score_curves: curves come with the deletion and insertion")
    assert text.endswith("or unset score_curves")


def test_score_curves_with_a_curve_score_reach_the_plan() -> None:
    plan = plan_of(request(scores=[pb.SCORE_DELETION_AUC], score_steps=5, score_curves=True))
    assert (plan.scores, plan.score_steps, plan.score_curves) == (("deletion_auc",), 5, True)


def test_the_first_bad_field_is_reported() -> None:
    message = pb.ExplainRequest(
        images=[pb.Image(encoded=b"x")],
        methods=[42],
        output=pb.OutputOptions(scores=[9]),
    )
    assert refusal(message).startswith("methods[0]")


def _plan(**changes: Any) -> ExplainPlan:
    base = plan_of(request(resolution=pb.RESOLUTION_INPUT))
    values = {**base.__dict__, **changes}
    return ExplainPlan(**values)


def test_the_response_size_counts_curve_floats() -> None:
    geometry = [Geometry((32, 32), (32, 32), (0, 0, 32, 32))]
    heatmap = 32 * 32 * 4
    curves = _plan(scores=("deletion_auc", "insertion_auc"), score_steps=100, score_curves=True)
    scored = 2 * 9 + 2 * (4 * 101 + 3)
    limit = RESPONSE_OVERHEAD + heatmap + scored
    check_response_size(curves, geometry, meta(), limit)
    with pytest.raises(RequestError, match="fewer score steps or no score curves"):
        check_response_size(curves, geometry, meta(), limit - 1)
    # Without curves the same scores weigh a double each.
    plain = _plan(scores=("deletion_auc", "insertion_auc"), score_steps=100)
    check_response_size(plain, geometry, meta(), RESPONSE_OVERHEAD + heatmap + 2 * 9)


TRANSFORMER_LAYERS = (
    LayerSpec("patch_embed.proj", (16, 4, 4)),
    LayerSpec("blocks.0.norm1", (16, 4, 4), "tokens"),
    LayerSpec("stage.permute", (16, 4, 4), "nhwc"),
    LayerSpec("features", (16, 4, 4), "tokens"),
)


def test_a_method_that_cannot_explain_the_layer_is_refused_naming_layers_it_can() -> None:
    message = pb.ExplainRequest(
        images=[pb.Image(encoded=b"x")], methods=[pb.METHOD_GRADCAM, pb.METHOD_ABLATIONCAM]
    )
    with pytest.raises(RequestError) as refused:
        validate(message, meta(layers=TRANSFORMER_LAYERS), LIMITS)
    text = str(refused.value)
    assert text.startswith("methods: ablationcam cannot explain layer 'features'")
    assert "laid out tokens; it takes nchw layers" in text
    assert text.endswith("a layer it works at: patch_embed.proj")
    message.layer = "stage.permute"
    with pytest.raises(RequestError, match="laid out nhwc"):
        validate(message, meta(layers=TRANSFORMER_LAYERS), LIMITS)
    message.layer = "patch_embed.proj"
    assert validate(message, meta(layers=TRANSFORMER_LAYERS), LIMITS).methods == (
        "gradcam",
        "ablationcam",
    )
    # Methods made by the pass, and ScoreCAM's rows of the whole model, take any layout.
    message.layer = "features"
    message.methods[:] = [pb.METHOD_SCORECAM, pb.METHOD_EIGENCAM]
    assert validate(message, meta(layers=TRANSFORMER_LAYERS), LIMITS).layer == "features"


def test_a_method_the_model_does_not_offer_is_refused() -> None:
    offered = ModelMeta(**{**meta().__dict__, "methods": METHOD_INFO[:1]})
    message = pb.ExplainRequest(images=[pb.Image(encoded=b"x")], methods=[pb.METHOD_LAYERCAM])
    with pytest.raises(RequestError, match="methods: model 'tiny' does not offer layercam"):
        validate(message, offered, LIMITS)


def test_the_budget_is_counted_once_and_priced_by_admission() -> None:
    from camserve.server.followups import request_cost

    message = pb.ExplainRequest(
        images=[pb.Image(encoded=b"x", target=pb.Target(top_k=2)), pb.Image(encoded=b"x")],
        methods=[pb.METHOD_GRADCAM, pb.METHOD_ABLATIONCAM, pb.METHOD_SCORECAM],
        output=pb.OutputOptions(scores=[pb.SCORE_CONFIDENCE_CHANGE]),
    )
    plan = plan_of(message)
    assert plan.budget == RequestBudget((6, 3), channels=16, tail_methods=1, model_methods=1)
    assert plan.budget.maps == 9
    assert plan.budget.rows_per_copy == 1 + 16 + 16
    # Per image: the explain row, AblationCAM's two jobs of 8 rows at a quarter of a pass
    # each (2 + 2), ScoreCAM's 16 rows; then one confidence row per map.
    assert request_cost(plan, tail_fraction=0.25, chunk=8) == 2 * (1 + 4 + 16) + 9
    single = plan_of(pb.ExplainRequest(images=[pb.Image(encoded=b"x")]))
    assert single.budget == RequestBudget((1,), channels=16)
    assert not single.budget.rows_after_pass


def test_pixel_attributions_are_budgeted_as_rows_with_their_input_gradient() -> None:
    from camserve.server.followups import request_cost

    message = pb.ExplainRequest(
        images=[pb.Image(encoded=b"x", target=pb.Target(top_k=2)), pb.Image(encoded=b"x")],
        methods=[
            pb.METHOD_GRADCAM,
            pb.METHOD_SALIENCY,
            pb.METHOD_SMOOTHGRAD,
            pb.METHOD_INTEGRATED_GRADIENTS,
        ],
        pixel_attribution=pb.SaliencyOptions(samples=4, steps=3, seed=5),
    )
    plan = plan_of(message)
    assert plan.budget.maps_per_image == (8, 4)
    assert plan.budget.pixel_maps_per_image == (6, 3)
    assert plan.budget.input_gradient  # saliency: the explain row differentiates its input
    assert plan.budget.gradient_rows == 4 + 3 + 1  # SmoothGrad's copies, IG's points, baseline
    assert (plan.pixel.samples, plan.pixel.steps, plan.pixel.seed) == (4, 3, 5)
    # Per image: the explain row at two forward passes, then 8 rows at two each.
    assert request_cost(plan, tail_fraction=1.0, chunk=8) == 2 * (2 + 2 * 8)
    unseeded = plan_of(pb.ExplainRequest(images=[pb.Image(encoded=b"x")], methods=[13]))
    assert unseeded.pixel.samples == 25  # the defaults, and a seed drawn for the request
    assert 0 <= unseeded.pixel.seed < 2**63


@pytest.mark.parametrize(
    ("options", "start"),
    [
        (pb.SaliencyOptions(samples=201), "pixel_attribution.samples: 201 is outside 1..200"),
        (pb.SaliencyOptions(noise=-0.1), "pixel_attribution.noise: -0.1"),
        (pb.SaliencyOptions(reduction=9), "pixel_attribution.reduction: unknown value 9"),
        (pb.SaliencyOptions(quadrature=3, steps=1), "pixel_attribution.steps: 1 is outside 2"),
    ],
)
def test_bad_pixel_attribution_options_are_refused_naming_the_field(
    options: pb.SaliencyOptions, start: str
) -> None:
    message = pb.ExplainRequest(
        images=[pb.Image(encoded=b"x")], methods=[pb.METHOD_SMOOTHGRAD], pixel_attribution=options
    )
    assert refusal(message).startswith(start)
