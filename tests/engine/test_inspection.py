"""Feature maps and gate values from the explain pass (`camserve.server.engine.inspection`):
equal to plain forward hooks, from the same forward, and forward-only when nothing else is
asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest
import timm
import torch
from torch import nn

from camserve.server.engine import CamEngine, RowRequest, transfer
from camserve.server.engine.gates import find_gates
from camserve.server.engine.types import (
    INDICES,
    TOP_GRADCAM,
    TOP_MEAN,
    FeatureAsk,
    Inspection,
    feature_keys,
    gate_key,
)
from tests._support.servers import seeded_model

SIZE = (64, 64)
Images = Callable[..., torch.Tensor]


@contextmanager
def plain_hooks(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """What a notebook does: a forward hook per module keeping a copy of its output."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.__setitem__(
                name, output.detach().float().clone()
            )
        )
        for name in names
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def reference(engine: CamEngine, batch: torch.Tensor, names: Sequence[str]) -> dict:
    """Every named module's output in a plain inference forward of the engine's own model."""
    with plain_hooks(engine.model, names) as seen, torch.no_grad():
        engine.model(batch.to(memory_format=torch.channels_last) if engine.channels_last else batch)
    return seen


def first(layers: Sequence[str], count: int = 9) -> Inspection:
    return Inspection(features=tuple(FeatureAsk(layer, count=count) for layer in layers))


def assert_first_channels(result, seen, layers: Sequence[str], row: int, count: int) -> None:
    for layer in layers:
        keys = feature_keys(layer)
        expected = seen[layer][row]
        channels = min(count, expected.shape[0])
        assert result.outputs[keys.channels].tolist() == list(range(channels))
        torch.testing.assert_close(
            result.outputs[keys.maps], expected[:channels], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            result.outputs[keys.means], expected.mean((1, 2)), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            result.outputs[keys.maxes], expected.amax((1, 2)), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize(
    ("arch", "layers"),
    [
        ("vgg11", ["features.0", "features.3", "features.10"]),  # each followed by ReLU(inplace)
        ("resnet18", ["conv1", "bn1", "layer1", "layer4"]),  # bn1 is then ReLU'd in place
    ],
)
def test_feature_maps_equal_plain_hooks_beside_gradcam(
    arch: str, layers: list[str], make_engine: Callable[..., CamEngine], random_images: Images
) -> None:
    engine = make_engine(seeded_model(arch, num_classes=10))
    batch = random_images(3, SIZE, seed=1)
    default = engine.default_layer(SIZE)
    rows = [
        RowRequest(default, inspection=first(layers)),
        RowRequest(default),
        RowRequest(default, methods=(), inspection=first(layers[:1], count=4)),
    ]
    results = engine.explain_batch(batch, rows)
    seen = reference(engine, batch, layers)
    assert_first_channels(results[0], seen, layers, row=0, count=9)
    assert_first_channels(results[2], seen, layers[:1], row=2, count=4)
    assert dict(results[1].outputs) == {}
    alone = engine.explain_batch(batch[1:2], [RowRequest(default)])[0]
    torch.testing.assert_close(results[1].maps, alone.maps, rtol=0, atol=1e-6)
    assert results[0].maps.keys() == alone.maps.keys()


def test_efficientnet_b0_gates_and_features_equal_hooks(
    make_engine: Callable[..., CamEngine], random_images: Images
) -> None:
    model = seeded_model("efficientnet_b0", num_classes=10)
    gates = [gate.name for gate in find_gates(model, SIZE)]
    assert len(gates) == 16
    engine = make_engine(model)
    batch = random_images(2, SIZE, seed=3)
    layers = ["features.1", "features.4"]
    inspection = Inspection(features=first(layers).features, gates=tuple(gates))
    rows = [RowRequest("features", inspection=inspection), RowRequest("features")]
    results = engine.explain_batch(batch, rows)
    seen = reference(engine, batch, [*layers, *gates])
    assert_first_channels(results[0], seen, layers, row=0, count=9)
    for name in gates:
        got = results[0].outputs[gate_key(name)]
        torch.testing.assert_close(got, seen[name][0].flatten(), rtol=0, atol=1e-6)
    assert not any(key.startswith("gate/") for key in results[1].outputs)


def test_cbam_channel_and_spatial_gates_forward_only(
    make_engine: Callable[..., CamEngine], random_images: Images
) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args={"attn_layer": "cbam"}, num_classes=5).eval()
    gates = find_gates(model, SIZE)
    spatial = next(gate.name for gate in gates if gate.kind == "spatial")
    channel = next(gate.name for gate in gates if gate.kind == "channel")
    engine = make_engine(model)
    batch = random_images(2, SIZE, seed=4)
    inspection = Inspection(features=first(["layer1"]).features, gates=(channel, spatial))
    results = engine.explain_batch(batch, [RowRequest("layer4", (), inspection=inspection)] * 2)
    seen = reference(engine, batch, ["layer1", channel, spatial])
    for row, result in enumerate(results):
        assert_first_channels(result, seen, ["layer1"], row=row, count=9)
        torch.testing.assert_close(
            result.outputs[gate_key(channel)], seen[channel][row].flatten(), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            result.outputs[gate_key(spatial)], seen[spatial][row, 0], rtol=0, atol=1e-6
        )
        assert result.logits.numel() == 0  # forward only, stopped before the head


def test_token_layers_come_back_as_channel_first_grids(
    tiny_vit: nn.Module, make_engine: Callable[..., CamEngine], random_images: Images
) -> None:
    engine = make_engine(tiny_vit)
    batch = random_images(2, (32, 32), seed=5)
    layer = "blocks.0"
    results = engine.explain_batch(
        batch, [RowRequest("blocks.0.norm1", inspection=first([layer]))] * 2
    )
    tokens = reference(engine, batch, [layer])[layer]  # (N, 3 + 16, 32): class, 2 registers
    grids = tokens[:, 3:].unflatten(1, (4, 4)).permute(0, 3, 1, 2)
    for row, result in enumerate(results):
        planes = result.outputs[feature_keys(layer).maps]
        assert planes.shape == (9, 4, 4)
        torch.testing.assert_close(planes, grids[row, :9], rtol=0, atol=1e-6)


def test_channel_selections(
    seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine], random_images: Images
) -> None:
    engine = make_engine(seeded_resnet18)
    batch = random_images(2, SIZE, seed=6)
    asks = (
        FeatureAsk("layer2", TOP_MEAN, 5),
        FeatureAsk("layer3", TOP_GRADCAM, 4),
        FeatureAsk("layer1", INDICES, 3, (7, 0, 63)),
    )
    results = engine.explain_batch(
        batch, [RowRequest("layer4", classes=(3,), inspection=Inspection(asks))] * 2
    )
    seen = reference(engine, batch, ["layer1", "layer2", "layer3"])
    # The Grad-CAM weights of class 3 at layer3, the textbook way.
    leaf = seen["layer3"].clone().requires_grad_()
    with torch.enable_grad():
        logits = engine.model.fc(torch.flatten(engine.model.avgpool(engine.model.layer4(leaf)), 1))
        (gradient,) = torch.autograd.grad(logits[:, 3].sum(), leaf)
    weights = gradient.mean((2, 3))
    for row, result in enumerate(results):
        by_mean = torch.topk(seen["layer2"][row].mean((1, 2)), 5).indices
        assert result.outputs[feature_keys("layer2").channels].tolist() == by_mean.tolist()
        by_weight = torch.topk(weights[row], 4).indices
        assert result.outputs[feature_keys("layer3").channels].tolist() == by_weight.tolist()
        torch.testing.assert_close(
            result.outputs[feature_keys("layer3").maps],
            seen["layer3"][row, by_weight],
            rtol=0,
            atol=1e-6,
        )
        assert result.outputs[feature_keys("layer1").channels].tolist() == [7, 0, 63]
        torch.testing.assert_close(
            result.outputs[feature_keys("layer1").maps],
            seen["layer1"][row, [7, 0, 63]],
            rtol=0,
            atol=1e-6,
        )


def test_inspection_only_batches_stop_after_the_deepest_module_in_one_transfer(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Images,
    monkeypatch: pytest.MonkeyPatch,
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    engine = make_engine(seeded_resnet18)
    engine.layers(SIZE)  # the probe pass at this size, as a server runs at load
    batch = random_images(2, SIZE, seed=7)
    ran: list[str] = []
    handles = [
        engine.model.get_submodule(name).register_forward_hook(
            lambda *_, name=name: ran.append(name)
        )
        for name in ("layer2", "layer3", "fc")
    ]
    transfers: list[int] = []
    to_host = transfer.to_host

    def counted(tensors):  # type: ignore[no-untyped-def]
        transfers.append(len(tensors))
        return to_host(tensors)

    monkeypatch.setattr(transfer, "to_host", counted)
    try:
        results = engine.explain_batch(
            batch, [RowRequest("layer4", (), inspection=first(["conv1", "layer2"]))] * 2
        )
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["layer2"]  # layer3, layer4 and the head never ran
    assert len(transfers) == 1
    assert all(result.logits.numel() == 0 and not result.maps for result in results)
    assert_no_hooks(engine.model)
    seen = reference(engine, batch, ["conv1", "layer2"])
    assert_first_channels(results[1], seen, ["conv1", "layer2"], row=1, count=9)


@pytest.mark.gpu
@pytest.mark.parametrize("methods", [("gradcam",), ()])
def test_on_cuda_the_maps_equal_hooks_and_leave_in_one_transfer(
    seeded_resnet18: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Images,
    monkeypatch: pytest.MonkeyPatch,
    methods: tuple[str, ...],
) -> None:
    engine = make_engine(seeded_resnet18, device="cuda")
    engine.layers(SIZE)
    batch = random_images(4, SIZE, seed=8)
    transfers: list[int] = []
    to_host = transfer.to_host

    def counted(tensors):  # type: ignore[no-untyped-def]
        transfers.append(len(tensors))
        return to_host(tensors)

    monkeypatch.setattr(transfer, "to_host", counted)
    inspection = Inspection(
        features=(FeatureAsk("bn1", count=8), FeatureAsk("layer2", TOP_MEAN, 8)),
    )
    results = engine.explain_batch(
        batch, [RowRequest("layer4", methods, inspection=inspection)] * 4
    )
    assert len(transfers) == 1
    seen = reference(engine, batch.cuda(), ["bn1", "layer2"])
    for row, result in enumerate(results):
        bn1 = result.outputs[feature_keys("bn1").maps]
        assert bn1.device.type == "cpu"
        torch.testing.assert_close(bn1, seen["bn1"][row, :8].cpu(), rtol=0, atol=1e-6)
        chosen = result.outputs[feature_keys("layer2").channels]
        torch.testing.assert_close(
            result.outputs[feature_keys("layer2").maps],
            seen["layer2"][row, chosen.cuda()].cpu(),
            rtol=0,
            atol=1e-6,
        )
