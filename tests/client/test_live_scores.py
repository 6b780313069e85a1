"""Every method, smoothing and faithfulness scores through a real server and both SDK clients
(the ten-class tiny network of tests._support.traffic, so every method runs in milliseconds)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from camserve.client import AsyncClient, Client, InvalidArgument
from camserve.client.requests import METHODS
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support.servers import CAT_BYTES, CAT_JPEG, ServerThread
from tests._support.traffic import tiny_model

ALL_SCORES = ("confidence_change", "deletion_auc", "insertion_auc")
STEPS = 5
PIXELS = 32 * 32  # the tiny model's input


@pytest.fixture(scope="module")
def tiny_server(test_settings) -> Iterator[ServerThread]:
    from camserve.server.settings import LimitsSettings

    server = ServerThread(
        test_settings(
            models=(tiny_model(),), metrics_port=-1, limits=LimitsSettings(max_score_steps=50)
        )
    )
    yield server
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(tiny_server) -> Iterator[Client]:
    with Client(address=tiny_server.address, timeout=60) as client:
        yield client


def fractions(steps: int) -> np.ndarray:
    """x_k = floor(k * P / S) / P: the share of pixels perturbed at step k."""
    return (np.arange(steps + 1) * PIXELS // steps) / PIXELS


def test_every_method_gets_every_score_and_its_curves(client) -> None:
    explanation = client.explain(
        CAT_JPEG,
        methods=list(METHODS),
        scores=["confidence", "deletion", "insertion"],
        score_steps=STEPS,
        score_curves=True,
    )
    assert [method for method, _ in explanation.heatmaps] == list(METHODS)
    assert set(explanation.scores) == set(explanation.heatmaps)
    assert set(explanation.curves) == set(explanation.heatmaps)
    p = explanation.top.probability  # the heatmaps explain the predicted class
    for key, scores in explanation.scores.items():
        assert tuple(scores) == ALL_SCORES, key
        assert scores["confidence_change"] > -1
        curves = explanation.curves[key]
        deletion, insertion = curves["deletion_auc"], curves["insertion_auc"]
        assert len(deletion) == len(insertion) == STEPS + 1
        # Deletion starts on the image and ends on the baseline; insertion the other way round.
        assert deletion[0] == pytest.approx(p, rel=1e-5)
        assert insertion[-1] == pytest.approx(p, rel=1e-5)
        assert deletion[-1] == pytest.approx(insertion[0], rel=1e-5)
        # Each area is the trapezoidal rule over its own curve.
        for name, curve in curves.items():
            area = np.trapezoid(np.asarray(curve, np.float64), fractions(STEPS))
            assert scores[name] == pytest.approx(area, abs=1e-6), (key, name)


def test_scores_come_only_when_asked_and_curves_only_with_score_curves(client) -> None:
    plain = client.explain(CAT_JPEG, methods=["gradcam", "eigencam"])
    assert not plain.scores
    assert not plain.curves
    scored = client.explain(CAT_JPEG, methods="hirescam", scores="deletion")
    assert dict(scored.scores[("hirescam", scored.top.index)]).keys() == {"deletion_auc"}
    assert not scored.curves


def test_default_steps_give_twenty_one_points(client) -> None:
    explanation = client.explain(CAT_JPEG, scores="insertion", score_curves=True)
    (curves,) = explanation.curves.values()
    assert len(curves["insertion_auc"]) == 21


def test_scores_do_not_depend_on_the_output_options(client) -> None:
    """Scores are computed from the map at input resolution, whatever is sent back."""
    options = {"methods": "layercam", "scores": ["confidence", "deletion"], "score_steps": 4}
    original = client.explain(CAT_JPEG, **options)
    small = client.explain(CAT_JPEG, resolution=(7, 9), dtype="uint8", **options)
    assert small.heatmap().shape == (7, 9)
    assert dict(next(iter(small.scores.values()))) == pytest.approx(
        dict(next(iter(original.scores.values()))), rel=1e-6
    )


def test_smoothing_options_change_the_maps(client) -> None:
    base = client.explain(CAT_JPEG, methods="gradcampp", resolution="input").heatmap()
    eigen = client.explain(
        CAT_JPEG, methods="gradcampp", resolution="input", eigen_smooth=True
    ).heatmap()
    augmented = client.explain(
        CAT_JPEG, methods="gradcampp", resolution="input", aug_smooth=True, scores="confidence"
    )
    assert base.shape == eigen.shape == augmented.heatmap().shape == (32, 32)
    assert not np.allclose(base, eigen)
    assert not np.allclose(base, augmented.heatmap())
    assert set(augmented.scores) == {("gradcampp", augmented.top.index)}


def test_model_lists_every_method_with_costs(client) -> None:
    info = client.model("tiny")
    assert info.methods == tuple(METHODS)  # a ReLU network: the guided methods too
    assert tuple(cost.method for cost in info.method_costs) == tuple(METHODS)
    channels = 16  # the tiny network's last layer
    # Pixel attributions take the gradient at the input: a row costs two forward passes;
    # SmoothGrad's 25 default copies and IG's 50 default steps plus its baseline add rows.
    gradient_rows = {"smoothgrad": 25, "integrated_gradients": 51}
    input_rows = ("saliency", "input_x_gradient", "guided_backprop", "guided_gradcam")
    for name in METHODS:
        cost = info.cost(name)
        if name in ("ablationcam", "scorecam"):
            assert cost.rows_per_image == 1 + channels
        elif name in gradient_rows:
            rows = gradient_rows[name]
            assert (cost.rows_per_image, cost.forward_passes) == (1 + rows, 1.0 + 2 * rows)
        elif name in input_rows:
            assert (cost.rows_per_image, cost.forward_passes) == (1, 2.0)
        else:
            assert (cost.rows_per_image, cost.forward_passes) == (1, 1.0)
    assert info.cost("scorecam").forward_passes == 1 + channels
    assert 1 < info.cost("ablationcam").forward_passes < info.cost("scorecam").forward_passes


def test_the_server_refuses_steps_over_its_limit(client) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.explain(CAT_JPEG, scores="deletion", score_steps=51)
    assert refused.value.message.startswith("output.score_steps: 51 is outside 1..50")


@pytest.mark.parametrize(
    ("output", "changes", "start"),
    [
        (pb.OutputOptions(scores=[pb.SCORE_DELETION_AUC, 7]), {}, "output.scores[1]: unknown"),
        (pb.OutputOptions(scores=[0]), {}, "output.scores[0]: unknown score 0"),
        (pb.OutputOptions(score_steps=5), {}, "output.score_steps: steps only apply"),
        (pb.OutputOptions(score_curves=True), {}, "output.score_curves: curves come with"),
        (
            pb.OutputOptions(resolution=pb.RESOLUTION_FEATURE_MAP),
            {"aug_smooth": True},
            "aug_smooth: cannot be combined with output.resolution",
        ),
        (pb.OutputOptions(), {"methods": [99]}, "methods[0]: unknown method 99"),
    ],
)
def test_refusals_are_invalid_argument_naming_the_field(tiny_server, output, changes, start):
    request = pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES)], output=output, **changes)
    with (
        grpc.insecure_channel(tiny_server.address) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(start)


async def test_the_asyncio_client_gets_the_same_scores(tiny_server, client) -> None:
    options = {
        "methods": ["scorecam", "xgradcam"],
        "scores": ["insertion_auc", "confidence"],
        "score_steps": 6,
        "score_curves": True,
    }
    expected = client.explain(CAT_JPEG, **options)
    async with AsyncClient(address=tiny_server.address, timeout=60) as aio:
        got = await aio.explain(CAT_JPEG, **options)
        info = await aio.model("tiny")
    assert list(got.scores) == list(expected.scores)
    for key, scores in got.scores.items():
        assert tuple(scores) == ("confidence_change", "insertion_auc")  # wire order
        assert dict(scores) == pytest.approx(dict(expected.scores[key]), rel=1e-6)
        assert len(got.curves[key]["insertion_auc"]) == 7
    assert info.method_costs == client.model("tiny").method_costs
