"""Each method's cost per image, for admission and GetModel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from camserve.server.engine import NAMES, PASS_METHODS, CamEngine, EngineError, method_cost
from camserve.server.engine.costs import MethodCost


def test_costs_in_rows_and_forward_passes() -> None:
    assert method_cost("gradcam", channels=512, tail_fraction=0.01) == MethodCost(1, 0, 1.0)
    assert method_cost("eigencam", channels=512, tail_fraction=0.01, aug_smooth=True) == (
        MethodCost(6, 0, 6.0)
    )
    ablation = method_cost("ablationcam", channels=512, tail_fraction=0.01)
    assert (ablation.rows, ablation.forward_passes) == (513, pytest.approx(1 + 5.12))
    score = method_cost("scorecam", channels=512, tail_fraction=0.01, aug_smooth=True)
    assert (score.explain_rows, score.follow_up_rows, score.forward_passes) == (6, 3072, 3078.0)
    with pytest.raises(EngineError, match="unknown method 'gradcam2'"):
        method_cost("gradcam2", channels=4, tail_fraction=0.5)
    with pytest.raises(EngineError, match=r"tail_fraction must be in \[0, 1\]"):
        method_cost("ablationcam", channels=4, tail_fraction=1.5)


def test_engine_reports_costs_at_a_layer(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_resnet18)
    costs = engine.method_costs("layer4", (64, 64))
    assert tuple(costs) == NAMES
    assert all(costs[m].forward_passes == 1.0 for m in PASS_METHODS)
    # Pixel attributions differentiate the input: two forward passes per row.
    assert costs["saliency"].forward_passes == costs["guided_gradcam"].forward_passes == 2.0
    assert costs["smoothgrad"].follow_up_rows == 25  # its default copies
    assert costs["integrated_gradients"].follow_up_rows == 51  # 50 steps and the baseline
    # After layer4 only the pooling and the classifier run: a tiny share of a forward pass.
    assert costs["ablationcam"].follow_up_rows == 512
    assert 1.0 < costs["ablationcam"].forward_passes < 0.01 * 512 + 1
    assert costs["scorecam"].forward_passes == 513.0
    deeper = engine.method_costs("layer3", (64, 64))
    assert deeper["ablationcam"].forward_passes / 256 > costs["ablationcam"].forward_passes / 512
