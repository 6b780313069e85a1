"""Pixel attributions against Captum and pytorch-grad-cam, on seeded torchvision models at 64x64.

resnet18 (ReLU modules, one shared per block), vgg11 (in-place ReLUs, and ReLUs after the target
layer) and densenet121 (a functional ReLU after its features, which module hooks never see).
Every comparison is within 1e-4 of the reference's largest value.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLU, GuidedBackpropReLUModel
from torch import nn

from camserve.server.engine import CamEngine, EngineError, RowRequest, RowResult
from camserve.server.engine.gradient_rows import (
    SaliencyParams,
    delta_kind,
    explain_with_gradient_rows,
)
from camserve.server.engine.saliency import noise_sigma, noisy_copies
from camserve.server.engine.types import ATTRIBUTIONS, attribution_kind
from tests._support.servers import seeded_model

TOLERANCE = 1e-4
TARGETS = (3, 7)  # one class per image: per-row targets
PIXEL = ("saliency", "input_x_gradient", "guided_backprop", "guided_gradcam")
CASES = {"resnet18": "layer4", "vgg11": "features.20"}
GRADCAM_TARGETS = {"resnet18": TARGETS, "vgg11": (4, 9)}


@pytest.fixture(autouse=True)
def _quiet_captum() -> Iterator[None]:
    """Captum warns that it sets hooks on ReLUs; that is what is being compared."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: seeded_model(arch, num_classes=10) for arch in CASES}


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def close(mine: torch.Tensor, reference: torch.Tensor) -> None:
    scale = float(reference.abs().max())
    assert scale > 0, "the reference must not be all zeros"
    assert float((mine - reference).abs().max()) <= TOLERANCE * max(scale, 1.0)


def explained(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    methods: tuple[str, ...],
    channels_last: bool | None = None,
) -> list[RowResult]:
    engine = CamEngine(copy.deepcopy(model), channels_last=channels_last)
    rows = [
        RowRequest(layer, methods, classes=(target,), outputs=(ATTRIBUTIONS,)) for target in TARGETS
    ]
    return engine.explain_batch(images, rows)


def attribution(result: RowResult, method: str) -> torch.Tensor:
    return result.outputs[attribution_kind(method)][0]


@pytest.mark.parametrize("arch", list(CASES))
def test_gradients_equal_captum_saliency_input_x_gradient_and_guided_backprop(
    arch: str, models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    model, layer = models[arch], CASES[arch]
    images = random_images(2, (64, 64))
    results = explained(model, images, layer, PIXEL)
    target = torch.tensor(TARGETS)
    reference = frozen_copy(model)
    saliency = Saliency(reference).attribute(images.clone(), target=target, abs=True)
    times_input = InputXGradient(reference).attribute(images.clone(), target=target)
    guided = GuidedBackprop(reference).attribute(images.clone(), target=target)
    for i, result in enumerate(results):
        close(attribution(result, "saliency").abs(), saliency[i])
        close(result.maps[("saliency", TARGETS[i])], saliency[i].amax(dim=0))  # max_abs
        close(attribution(result, "input_x_gradient"), times_input[i])
        close(result.maps[("input_x_gradient", TARGETS[i])], times_input[i].sum(dim=0))
        close(attribution(result, "guided_backprop"), guided[i])


@pytest.mark.parametrize("arch", list(CASES))
def test_guided_backprop_equals_pytorch_grad_cam_for_image_0(
    arch: str, models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    """pytorch-grad-cam returns image 0 only, and swaps the model's ReLUs: run it on a copy."""
    model, layer = models[arch], CASES[arch]
    images = random_images(2, (64, 64), seed=1)
    (first, _) = explained(model, images, layer, ("guided_backprop",))
    theirs = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
    reference = torch.from_numpy(theirs(images[:1].clone(), target_category=TARGETS[0]))
    close(attribution(first, "guided_backprop"), reference.permute(2, 0, 1))


@pytest.mark.parametrize("arch", list(CASES))
def test_guided_gradcam_is_guided_backprop_times_bilinear_gradcam_from_one_forward(
    arch: str, models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    model, layer = models[arch], CASES[arch]
    images = random_images(2, (64, 64), seed=2)
    targets = GRADCAM_TARGETS[arch]  # classes whose Grad-CAM is not all zero here
    forwards = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal forwards
        forwards += 1

    engine = CamEngine(copy.deepcopy(model))
    rows = [
        RowRequest(
            layer,
            ("gradcam", "guided_backprop", "guided_gradcam"),
            classes=(t,),
            outputs=(ATTRIBUTIONS,),
        )
        for t in targets
    ]
    engine.explain_batch(images, rows)  # the first call also probes the model (once)
    handle = engine.model.register_forward_hook(count)
    results = engine.explain_batch(images, rows)
    handle.remove()
    assert forwards == 1
    target = torch.tensor(targets)
    reference = frozen_copy(model)
    captum = GuidedGradCam(reference, reference.get_submodule(layer)).attribute(
        images.clone(), target=target, interpolate_mode="bilinear"
    )
    for i, result in enumerate(results):
        cam = result.maps[("gradcam", targets[i])]  # raw, ReLU'd, at the layer's resolution
        upsampled = F.interpolate(cam[None, None], size=(64, 64), mode="bilinear")[0]
        by_hand = attribution(result, "guided_backprop") * upsampled
        close(attribution(result, "guided_gradcam"), by_hand)
        close(attribution(result, "guided_gradcam"), captum[i])


@pytest.mark.parametrize("quadrature", ["gausslegendre", "riemann_trapezoid", "riemann_right"])
def test_integrated_gradients_equal_captum_with_its_convergence_delta(
    quadrature: str, models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    model = models["resnet18"]
    images = random_images(2, (64, 64), seed=3)
    params = SaliencyParams(steps=8, quadrature=quadrature)
    rows = [
        RowRequest("layer4", ("integrated_gradients",), classes=(t,), outputs=(ATTRIBUTIONS,))
        for t in TARGETS
    ]
    engine = CamEngine(copy.deepcopy(model))
    results = explain_with_gradient_rows(engine, images, rows, params, chunk_rows=3)
    ig = IntegratedGradients(frozen_copy(model))
    theirs, deltas = ig.attribute(
        images.clone(),
        target=torch.tensor(TARGETS),
        n_steps=8,
        method=quadrature,
        return_convergence_delta=True,
    )
    for i, result in enumerate(results):
        close(attribution(result, "integrated_gradients"), theirs[i])
        close(result.maps[("integrated_gradients", TARGETS[i])], theirs[i].sum(dim=0))
        delta = float(result.outputs[delta_kind("integrated_gradients")][0])
        assert delta == pytest.approx(float(deltas[i]), abs=1e-4)


def test_smoothgrad_is_the_mean_gradient_over_seeded_noisy_copies(
    models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    """sigma = 0.15 x (max - min) of each input; the same seed gives the same map however the
    copies are chunked, another seed another map."""
    model = models["resnet18"]
    images = random_images(2, (64, 64), seed=4)
    rows = [
        RowRequest("layer4", ("smoothgrad",), classes=(t,), outputs=(ATTRIBUTIONS,))
        for t in TARGETS
    ]
    engine = CamEngine(copy.deepcopy(model))
    params = SaliencyParams(samples=5, seed=11)
    results = explain_with_gradient_rows(engine, images, rows, params, chunk_rows=2)
    again = explain_with_gradient_rows(engine, images, rows, params, chunk_rows=7)
    other = explain_with_gradient_rows(engine, images, rows, SaliencyParams(samples=5, seed=12))
    for i, result in enumerate(results):
        sigma = noise_sigma(images[i], 0.15)
        assert sigma == pytest.approx(0.15 * float(images[i].max() - images[i].min()))
        copies = noisy_copies(images[i], sigma, 11, 0, 5)
        plain = engine.explain_batch(
            copies,
            [RowRequest("layer4", ("saliency",), classes=(TARGETS[i],), outputs=(ATTRIBUTIONS,))]
            * 5,
        )
        mean = torch.stack([attribution(r, "saliency") for r in plain]).mean(dim=0)
        close(attribution(result, "smoothgrad"), mean)
        close(attribution(again[i], "smoothgrad"), attribution(result, "smoothgrad"))
        assert not torch.allclose(attribution(other[i], "smoothgrad"), mean, atol=1e-6)


def _guided_densenet_reference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Guided backprop through densenet121 by hand: pytorch-grad-cam's guided ReLU for every
    ReLU module and for the functional one its forward applies to the features."""
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule
    from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive

    net = frozen_copy(model)
    replace_all_layer_type_recursive(net, nn.ReLU, GuidedBackpropReLUasModule())
    x = images.clone().requires_grad_()
    features = GuidedBackpropReLU.apply(net.features(x))
    logits = net.classifier(torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1))
    chosen = logits.gather(1, torch.tensor(TARGETS)[:, None]).sum()
    (gradient,) = torch.autograd.grad(chosen, x)
    return gradient


def test_densenet_functional_relu_is_guided_too(
    random_images: Callable[..., torch.Tensor],
) -> None:
    """Module hooks (Captum) miss densenet's functional last ReLU; camserve's guide does not.

    In the reference's memory format: channels-last convolutions sum in another order, and at a
    ReLU's kink that moves one pixel's guided gradient by about 1e-4 of the largest."""
    model = seeded_model("densenet121", num_classes=10)
    images = random_images(2, (64, 64), seed=5)
    results = explained(model, images, "features", ("guided_backprop",), channels_last=False)
    reference = _guided_densenet_reference(model, images)
    captum = GuidedBackprop(frozen_copy(model)).attribute(
        images.clone(), target=torch.tensor(TARGETS)
    )
    for i, result in enumerate(results):
        close(attribution(result, "guided_backprop"), reference[i])
    assert not torch.allclose(captum, reference, atol=1e-6)  # what module hooks alone give


def test_guided_methods_are_refused_naming_the_smooth_activation(
    seeded_mobilenet: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    engine = make_engine(seeded_mobilenet)
    with pytest.raises(
        EngineError,
        match=r"needs ReLU or ReLU6 nonlinearities; this model uses "
        r"Hardswish \(at features\.0\.2",
    ):
        engine.explain_batch(
            torch.zeros(1, 3, 64, 64), [RowRequest("features", ("guided_backprop",))]
        )
    found = engine.nonlinearities((64, 64))
    assert not found.guided
    assert set(found.others) == {"Hardswish", "Hardsigmoid"}
    # The other pixel attributions still apply.
    (result,) = engine.explain_batch(
        torch.zeros(1, 3, 64, 64), [RowRequest("features", ("saliency",))]
    )
    assert result.maps[("saliency", result.classes[0])].shape == (64, 64)


def test_lite0_relu6_model_gets_the_guided_rule(
    lite0: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    """ReLU6's guided rule is g * 1[0 < x < 6] * 1[g > 0]: checked against the definition."""
    engine = make_engine(lite0)
    found = engine.nonlinearities((64, 64))
    assert found.guided
    assert (found.relu, found.relu6 > 0) == (0, True)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    (result,) = engine.explain_batch(
        images, [RowRequest("head", ("guided_backprop",), classes=(5,), outputs=(ATTRIBUTIONS,))]
    )
    net = frozen_copy(lite0)

    class GuidedReLU6(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            ctx.save_for_backward(x)
            return x.clamp(0, 6)

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            (x,) = ctx.saved_tensors
            return g * ((x > 0) & (x < 6)) * (g > 0)

    def guided(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return GuidedReLU6.apply(inputs[0])

    handles = [m.register_forward_hook(guided) for m in net.modules() if isinstance(m, nn.ReLU6)]
    x = images.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(net(x)[0, 5], x)
    for handle in handles:
        handle.remove()
    close(attribution(result, "guided_backprop"), gradient[0])


@pytest.mark.parametrize("arch", list(CASES))
def test_the_model_is_left_as_it_was_and_no_parameter_gets_a_gradient(
    arch: str, models: dict[str, nn.Module], assert_no_hooks: Callable[[nn.Module], None]
) -> None:
    engine = CamEngine(copy.deepcopy(models[arch]))
    model = engine.model
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    before_modules = [(name, repr(m)) for name, m in model.named_modules()]
    before_relus = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        before = model(images)
    rows = [RowRequest(CASES[arch], (*PIXEL, "gradcam"), top_k=2)] * 2
    engine.explain_batch(images, rows)
    assert [(name, repr(m)) for name, m in model.named_modules()] == before_modules
    assert [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)] == before_relus
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert_no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_mixed_rows_each_equal_their_row_alone(
    models: dict[str, nn.Module], random_images: Callable[..., torch.Tensor]
) -> None:
    """Pixel, CAM and mixed rows in one batch (top-k per image): each gets what it gets alone."""
    engine = CamEngine(copy.deepcopy(models["vgg11"]))
    images = random_images(4, (64, 64), seed=8)
    layer = CASES["vgg11"]
    rows = [
        RowRequest(layer, ("saliency",), top_k=2),
        RowRequest(layer, ("gradcam",)),
        RowRequest(layer, ("guided_gradcam", "gradcam"), classes=(1,), reduction="sum_abs"),
        RowRequest(layer, ("input_x_gradient", "guided_backprop"), top_k=3),
    ]
    together = engine.explain_batch(images, rows)
    for i, row in enumerate(rows):
        (alone,) = engine.explain_batch(images[i : i + 1], [row])
        assert together[i].classes == alone.classes
        assert together[i].maps.keys() == alone.maps.keys()
        for key, value in alone.maps.items():
            close(together[i].maps[key], value)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tolerance"), [("float32", 3e-2), ("float16", 5e-2)])
def test_cuda_pixel_attributions_match_the_cpu_engine(
    models: dict[str, nn.Module],
    random_images: Callable[..., torch.Tensor],
    precision: str,
    tolerance: float,
) -> None:
    """On the device, in float32 and with float16 weights (the loss scale divided out of the
    input gradients too), the normalised maps equal the CPU engine's on average; SmoothGrad's
    seeded noise is drawn on the device and repeats itself.

    Averaged, not pixel by pixel: a pixel's input gradient jumps wherever a ReLU it passes
    through changes side, and any change of rounding moves some. The CPU engine alone, run
    contiguous instead of channels_last, moves vgg11's normalised saliency by up to 0.03 at one
    pixel (0.0005 on average); float32 convolutions on CUDA run in TF32 by default, and
    emulating that on the CPU moves it by up to 0.19 (0.012 on average)."""
    from camserve.server.engine import normalise

    model = models["vgg11"]
    images = random_images(2, (64, 64), seed=9)
    rows = [RowRequest("features.20", PIXEL, classes=(t,)) for t in GRADCAM_TARGETS["vgg11"]]
    on_cpu = CamEngine(copy.deepcopy(model)).explain_batch(images, rows)
    cuda = CamEngine(copy.deepcopy(model), device="cuda", precision=precision)
    on_cuda = cuda.explain_batch(images, rows)
    for mine, reference in zip(on_cuda, on_cpu, strict=True):
        for key, value in reference.maps.items():
            difference = normalise(mine.maps[key]) - normalise(value)
            assert float(difference.abs().mean()) <= tolerance, key
    smooth = [RowRequest("features.20", ("smoothgrad",), classes=(4,), outputs=(ATTRIBUTIONS,))]
    params = SaliencyParams(samples=4, seed=2)
    first = explain_with_gradient_rows(cuda, images[:1], smooth, params)
    again = explain_with_gradient_rows(cuda, images[:1], smooth, params, chunk_rows=3)
    # Another chunking may pick other cuDNN kernels: the same copies, up to their rounding.
    torch.testing.assert_close(
        attribution(first[0], "smoothgrad"),
        attribution(again[0], "smoothgrad"),
        rtol=1e-3,
        atol=1e-5,
    )
