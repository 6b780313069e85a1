"""Hooks as resources, frozen parameters, awkward models, bad requests and threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

from camserve.server.engine import (
    PASS_METHODS,
    CamEngine,
    EngineError,
    LayerError,
    ModelFault,
    RowRequest,
)
from camserve.server.engine.hooks import capture_targets


class _SmallNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> pool -> fc, with a switchable in-place ReLU."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class _TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.mean()


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _TupleBlock()
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.block(x)
        return self.fc(features.mean(dim=(2, 3)))


class _Failing(nn.Module):
    """Raises after the target layer when `fail` is set, as a buggy model might."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _SmallNet(inplace=False)
        self.fail = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.fail:
            raise RuntimeError("model exploded after the target layer")
        return out


@pytest.fixture
def resnet_engine(seeded_resnet18: nn.Module, make_engine: Callable[..., CamEngine]) -> CamEngine:
    return make_engine(seeded_resnet18)


def test_engine_takes_ownership_eval_mode_and_frozen(seeded_resnet18: nn.Module) -> None:
    import copy

    model = copy.deepcopy(seeded_resnet18).train()
    engine = CamEngine(model)
    assert engine.model is model
    assert not any(module.training for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_no_hooks_or_parameter_grads_left_after_success(
    resnet_engine: CamEngine,
    random_images: Callable[..., torch.Tensor],
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    batch = random_images(2, (128, 128))
    resnet_engine.layers((128, 128))
    resnet_engine.explain_batch(
        batch, [RowRequest("layer3", PASS_METHODS, top_k=2), RowRequest("layer4")]
    )
    resnet_engine.predict(batch)
    assert_no_hooks(resnet_engine.model)
    assert all(parameter.grad is None for parameter in resnet_engine.model.parameters())


def test_no_hooks_left_when_the_model_raises(
    random_images: Callable[..., torch.Tensor], assert_no_hooks: Callable[[nn.Module], None]
) -> None:
    model = _Failing()
    engine = CamEngine(model)
    batch = random_images(2, (12, 12))
    with pytest.raises(RuntimeError, match="exploded"):
        engine.explain_batch(batch, [RowRequest("net.conv2", top_k=2), RowRequest("net.act1")])
    assert_no_hooks(model)
    model.fail = False
    results = engine.explain_batch(
        batch, [RowRequest("net.conv2", top_k=2), RowRequest("net.act1")]
    )
    assert len(results[0].maps) == 2
    assert_no_hooks(model)


def test_nothing_before_the_target_layer_is_recorded(seeded_resnet18: nn.Module) -> None:
    """With frozen parameters the tape starts at the target layer: only avgpool and fc follow
    layer4, so the graph from the logits back to the captured activation holds no convolution."""
    import copy

    model = copy.deepcopy(seeded_resnet18).requires_grad_(False)
    with capture_targets({"layer4": model.layer4}, batch_size=2) as captures:
        logits = model(torch.randn(2, 3, 64, 64))
    activation = captures["layer4"].activation
    assert activation is not None
    assert activation.is_leaf
    assert activation.requires_grad
    seen: set[str] = set()
    stack = [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        seen.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert not any("Convolution" in name or "BatchNorm" in name for name in seen), seen


def test_inplace_relu_after_the_target_layer(random_images: Callable[..., torch.Tensor]) -> None:
    batch = random_images(2, (12, 12), seed=2)
    rows = [RowRequest("conv2", PASS_METHODS, top_k=2), RowRequest("conv1", PASS_METHODS)]
    inplace = CamEngine(_SmallNet(inplace=True)).explain_batch(batch, rows)
    plain = CamEngine(_SmallNet(inplace=False)).explain_batch(batch, rows)
    for a, b in zip(inplace, plain, strict=True):
        assert a.classes == b.classes
        for key, cam in b.maps.items():
            torch.testing.assert_close(a.maps[key], cam)


def test_module_called_twice_is_refused_with_the_enclosing_block(
    resnet_engine: CamEngine,
    random_images: Callable[..., torch.Tensor],
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    batch = random_images(1, (64, 64))
    with pytest.raises(LayerError) as caught:
        resnet_engine.explain_batch(batch, [RowRequest("layer4.1.relu")])
    message = str(caught.value)
    assert "'layer4.1.relu' runs 2 times per forward pass" in message
    assert "enclosing block 'layer4.1'" in message
    assert_no_hooks(resnet_engine.model)
    assert "layer4.1.relu" not in {spec.name for spec in resnet_engine.layers((64, 64))}


def test_tuple_output_and_unused_modules_are_refused(
    random_images: Callable[..., torch.Tensor], assert_no_hooks: Callable[[nn.Module], None]
) -> None:
    model = _TupleNet()
    engine = CamEngine(model)
    batch = random_images(1, (8, 8))
    with pytest.raises(LayerError, match=r"'block' returns a tuple, not a tensor.*block\.conv"):
        engine.explain_batch(batch, [RowRequest("block")])
    with pytest.raises(LayerError, match="'unused' did not run during the forward pass"):
        engine.explain_batch(batch, [RowRequest("unused")])
    assert_no_hooks(model)
    assert [spec.name for spec in engine.layers((8, 8))] == ["block.conv"]
    assert engine.explain_batch(batch, [RowRequest("block.conv")])[0].maps


def test_non_spatial_and_unknown_layers_are_refused(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(1, (64, 64))
    with pytest.raises(LayerError, match=r"'fc' outputs a tensor of shape \(1, 1000\)"):
        resnet_engine.explain_batch(batch, [RowRequest("fc")])
    with pytest.raises(LayerError) as caught:
        resnet_engine.explain_batch(batch, [RowRequest("layer5")])
    message = str(caught.value)
    assert "'layer5' is not a module of this model" in message
    assert "did you mean 'layer4'" in message
    assert "CamEngine.layers(input_size) lists them all" in message
    assert "earlier ones" in message  # resnet18 has more valid layers than a message shows


def test_a_model_in_train_mode_or_unfrozen_is_a_fault_not_a_refusal(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batch = random_images(1, (64, 64))
    resnet_engine.model.train()
    with pytest.raises(ModelFault, match="train mode"):
        resnet_engine.explain_batch(batch, [RowRequest("layer4")])
    with pytest.raises(ModelFault, match="train mode"):
        resnet_engine.predict(batch)
    resnet_engine.model.eval()
    resnet_engine.model.fc.weight.requires_grad_(True)
    with pytest.raises(ModelFault, match="requires_grad=True"):
        resnet_engine.explain_batch(batch, [RowRequest("layer4")])
    resnet_engine.model.requires_grad_(False)
    assert resnet_engine.explain_batch(batch, [RowRequest("layer4")])[0].maps


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([RowRequest("layer4")] * 2, r"rows has 2 entries but batch holds 1 images"),
        (
            [RowRequest("layer4", ("gradcam", "gradcam_smooth"))],
            r"rows\[0\]\.methods: unknown method",
        ),
        ([RowRequest("layer4", ())], r"rows\[0\]\.methods must be a non-empty tuple"),
        ([RowRequest("layer4", "gradcam")], r"rows\[0\]\.methods must be a non-empty tuple"),
        ([RowRequest("layer4", ("gradcam", "gradcam"))], r"lists a method twice"),
        ([RowRequest("layer4", classes=(1000,))], r"\[1000\] out of range; .* 1000 classes"),
        ([RowRequest("layer4", classes=(-1,))], r"rows\[0\]\.classes must be >= 0"),
        ([RowRequest("layer4", classes=(3, 3))], r"lists a class twice"),
        ([RowRequest("layer4", top_k=0)], r"rows\[0\]\.top_k must be an int >= 1"),
        ([RowRequest("layer4", top_k=1001)], r"top_k is 1001 but this model has only 1000"),
        ([RowRequest("")], r"rows\[0\]\.layer must be a module name"),
    ],
)
def test_bad_requests_name_the_argument(
    resnet_engine: CamEngine,
    random_images: Callable[..., torch.Tensor],
    rows: list[RowRequest],
    match: str,
) -> None:
    with pytest.raises(EngineError, match=match):
        resnet_engine.explain_batch(random_images(1, (64, 64)), rows)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (torch.zeros(3, 64, 64), r"batch must be \(N, 3, H, W\)"),
        (torch.zeros(0, 3, 64, 64), r"N >= 1"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float tensor"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_batches_are_refused(resnet_engine: CamEngine, batch: object, match: str) -> None:
    with pytest.raises(EngineError, match=match):
        resnet_engine.explain_batch(batch, [RowRequest("layer4")])  # type: ignore[arg-type]


def test_bad_engine_options_are_refused(seeded_resnet18: nn.Module) -> None:
    with pytest.raises(EngineError, match="precision 'float8'"):
        CamEngine(nn.Identity(), precision="float8")
    with pytest.raises(EngineError, match="not a torch device"):
        CamEngine(nn.Identity(), device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="needs a CUDA device"):
            CamEngine(nn.Identity(), precision="float16")
        with pytest.raises(EngineError, match="none is available"):
            CamEngine(nn.Identity(), device="cuda")


def test_two_engines_in_two_threads(
    seeded_resnet18: nn.Module,
    seeded_mobilenet: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    jobs = [
        (make_engine(seeded_resnet18), random_images(3, (96, 96), seed=11), "layer4"),
        (make_engine(seeded_mobilenet), random_images(3, (96, 96), seed=12), "features"),
    ]
    rows = {
        name: [
            RowRequest(name, PASS_METHODS, top_k=2),
            RowRequest(name),
            RowRequest(name, classes=(4,)),
        ]
        for _, _, name in jobs
    }
    expected = [engine.explain_batch(batch, rows[name]) for engine, batch, name in jobs]
    outcomes: dict[int, list[object]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(slot: int) -> None:
        engine, batch, name = jobs[slot]
        start.wait()
        for _ in range(4):
            try:
                outcomes[slot].append(engine.explain_batch(batch, rows[name]))
            except Exception as exc:  # reported below, with the thread's result
                outcomes[slot].append(exc)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for slot, runs in outcomes.items():
        assert len(runs) == 4
        for run in runs:
            assert isinstance(run, list), run
            for got, want in zip(run, expected[slot], strict=True):
                assert got.classes == want.classes
                for key, cam in want.maps.items():
                    torch.testing.assert_close(got.maps[key], cam)


def test_one_engine_shared_by_threads_serialises_calls(
    resnet_engine: CamEngine, random_images: Callable[..., torch.Tensor]
) -> None:
    batches = [random_images(1, (64, 64), seed=s) for s in range(4)]
    expected = [resnet_engine.explain_batch(b, [RowRequest("layer4", top_k=2)])[0] for b in batches]
    results: list[object] = [None] * 4

    def work(i: int) -> None:
        results[i] = resnet_engine.explain_batch(batches[i], [RowRequest("layer4", top_k=2)])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        assert got.classes == want.classes  # type: ignore[attr-defined]
        torch.testing.assert_close(got.maps, want.maps)  # type: ignore[attr-defined]
