"""A row may ask the explain pass for more than maps: its layer's activations come back in
`RowResult.outputs`, through the batch's one transfer to the host."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import CamEngine, EngineError, RowRequest, transfer
from camserve.server.engine.types import ACTIVATIONS


def test_activations_come_back_in_the_one_transfer(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(seeded_resnet18)
    batch = random_images(3, (64, 64), seed=2)
    seen: list[torch.Tensor] = []
    handle = engine.model.get_submodule("layer4").register_forward_hook(
        lambda module, inputs, output: seen.append(output.detach().float().clone())
    )
    transfers: list[int] = []
    to_host = transfer.to_host

    def counted(tensors):  # type: ignore[no-untyped-def]
        transfers.append(len(tensors))
        return to_host(tensors)

    monkeypatch.setattr(transfer, "to_host", counted)
    rows = [
        RowRequest("layer4", outputs=(ACTIVATIONS,)),
        RowRequest("layer4"),
        RowRequest("layer3", ("gradcam", "layercam"), outputs=(ACTIVATIONS,), aug_smooth=True),
    ]
    try:
        results = engine.explain_batch(batch, rows)
    finally:
        handle.remove()
    assert len(transfers) == 1  # logits, classes, every map and both activations at once
    got = results[0].outputs[ACTIVATIONS]
    assert got.device.type == "cpu"
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, seen[0][0], rtol=0, atol=0)
    assert dict(results[1].outputs) == {}
    assert results[2].outputs[ACTIVATIONS].shape == (256, 4, 4)  # the unaugmented copy's
    assert set(results[2].maps) == {(m, results[2].classes[0]) for m in ("gradcam", "layercam")}


def test_an_output_the_pass_does_not_make_is_refused(
    seeded_tiny: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = make_engine(seeded_tiny)
    with pytest.raises(EngineError, match=r"rows\[0\].outputs must list distinct output kinds"):
        engine.explain_batch(random_images(1, (32, 32)), [RowRequest("act", outputs=("grads",))])
