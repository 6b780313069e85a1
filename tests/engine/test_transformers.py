"""Vision transformers: token sequences and channels-last maps explained like feature maps.

Parity: at each model's default layer (and at the Swin block norm pytorch-grad-cam documents), all
five methods equal pytorch-grad-cam 1.5.7 given the reshape_transform its documentation
prescribes for that model (prefix tokens dropped and the grid restored; NHWC moved to NCHW), to
1e-4 after camserve's `normalise(to_input(...))`. Models have seeded random weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camserve.server.engine import (
    PASS_METHODS,
    CamEngine,
    EngineError,
    LayerError,
    LayerSpec,
    LayoutHints,
    RowRequest,
)
from tests._support.cams import SINGLE_PASS_REFERENCES, assert_maps_match_reference
from tests.engine.test_batching import assert_same_row

Transform = Callable[[torch.Tensor], torch.Tensor]


def vit_reshape(prefix: int, height: int, width: int) -> Transform:
    """pytorch-grad-cam's ViT reshape_transform, dropping `prefix` tokens instead of one."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return transform


def swin_reshape(height: int, width: int) -> Transform:
    """pytorch-grad-cam's Swin reshape_transform (NHWC, or (N, h * w, C), to NCHW)."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.reshape(tensor.size(0), height, width, tensor.size(-1))
        return result.transpose(2, 3).transpose(1, 2)

    return transform


def _start_tape_here(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_().clone()


def reference_maps(
    model: nn.Module,
    layer: str,
    transform: Transform | None,
    batch: torch.Tensor,
    classes: list[int],
) -> dict[str, np.ndarray]:
    """All five pytorch-grad-cam methods from one of its forward and backward passes.

    GradCAM runs the pass; each other method computes its maps from the activations and
    gradients GradCAM captured, through its own `compute_cam_per_layer` and
    `aggregate_multi_layers`, which is what its `forward` does after the pass.

    The model runs as the engine runs it: parameters frozen, the autograd tape starting at the
    target layer (a hook registered before pytorch-grad-cam's own makes the layer's output a
    fresh leaf). Layers before it then take the same kernels in both: with trainable
    parameters, torch's MultiheadAttention leaves its fused inference path, whose results differ
    in the last bits, and XGrad-CAM, which divides by per-channel sums of LayerNorm outputs that
    can come close to zero, amplifies such differences beyond 1e-4.
    """
    target = model.get_submodule(layer)
    targets = [ClassifierOutputTarget(c) for c in classes]
    maps: dict[str, np.ndarray] = {}
    model.requires_grad_(False)
    handle = target.register_forward_hook(_start_tape_here)
    try:
        with GradCAM(model=model, target_layers=[target], reshape_transform=transform) as cam:
            maps["gradcam"] = cam(input_tensor=batch, targets=targets)
            activations = list(cam.activations_and_grads.activations)
            gradients = list(cam.activations_and_grads.gradients)
    finally:
        handle.remove()
        model.requires_grad_(True)
    for method, reference in SINGLE_PASS_REFERENCES.items():
        if method == "gradcam":
            continue
        with reference(model=model, target_layers=[target]) as other:
            other.activations_and_grads.activations = list(activations)
            other.activations_and_grads.gradients = list(gradients)
            per_layer = other.compute_cam_per_layer(batch, targets, False)
            maps[method] = other.aggregate_multi_layers(per_layer)
    return maps


PARITY = [
    pytest.param(
        "seeded_vit_b_16",
        LayerSpec("encoder.layers.encoder_layer_11.ln_1", (768, 14, 14), "tokens"),
        vit_reshape(1, 14, 14),
        True,
        id="torchvision_vit_b_16",
    ),
    pytest.param(
        "seeded_swin_t",
        LayerSpec("permute", (768, 7, 7), "nchw"),
        None,
        True,
        id="torchvision_swin_t",
    ),
    pytest.param(
        "seeded_swin_t",
        LayerSpec("features.7.1.norm1", (768, 7, 7), "nhwc"),
        swin_reshape(7, 7),
        False,
        id="torchvision_swin_t_block_norm",
    ),
    pytest.param(
        "seeded_deit_distilled",
        LayerSpec("blocks.11.norm1", (192, 14, 14), "tokens"),
        vit_reshape(2, 14, 14),
        True,
        id="timm_deit_distilled",
    ),
    pytest.param(
        "seeded_vit_registers",
        LayerSpec("blocks.11.norm1", (384, 16, 16), "tokens"),
        vit_reshape(5, 16, 16),
        True,
        id="timm_vit_registers",
    ),
    pytest.param(
        "seeded_timm_swin",
        LayerSpec("norm", (768, 7, 7), "nhwc"),
        swin_reshape(7, 7),
        True,
        id="timm_swin_nhwc",
    ),
]


@pytest.mark.parametrize(("model", "spec", "transform", "is_default"), PARITY, indirect=["model"])
def test_every_method_matches_pytorch_grad_cam(
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
    model: nn.Module,
    spec: LayerSpec,
    transform: Transform | None,
    is_default: bool,
) -> None:
    size = (224, 224)
    engine = make_engine(model)
    assert spec in engine.layers(size)
    assert (engine.default_layer(size) == spec.name) is is_default
    batch = random_images(2, size, seed=7)
    classes = [3, 1]
    rows = [RowRequest(spec.name, PASS_METHODS, classes=(c,)) for c in classes]
    results = engine.explain_batch(batch, rows)

    expected = reference_maps(model, spec.name, transform, batch, classes)
    for method in PASS_METHODS:
        maps = [r.maps[(method, c)] for r, c in zip(results, classes, strict=True)]
        assert all(m.shape == spec.shape[1:] and float(m.max()) > 0 for m in maps), method
        # XGrad-CAM divides by per-channel sums of LayerNorm outputs that can come close to zero
        # (see `reference_maps`): the last bits in which two passes over a token layer differ
        # come out a few 1e-4 apart on a fraction of a percent of the pixels.
        ill_conditioned = method == "xgradcam" and spec.layout == "tokens"
        atol = 5e-4 if ill_conditioned else 1e-4
        assert_maps_match_reference(results, method, classes, size, expected[method], atol=atol)


def test_a_mixed_batch_of_token_and_map_layers_equals_each_row_alone(
    seeded_deit_distilled: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    engine = make_engine(seeded_deit_distilled)
    batch = random_images(3, (224, 224), seed=3)
    rows = [
        RowRequest("blocks.11.norm1", PASS_METHODS, classes=(3,)),
        RowRequest("patch_embed.proj", ("gradcam", "layercam"), top_k=2),  # NCHW convolution
        RowRequest("blocks.5.norm1", ("hirescam",), classes=(1,)),
    ]
    together = engine.explain_batch(batch, rows)
    for i, row in enumerate(rows):
        alone = engine.explain_batch(batch[i : i + 1], [row])[0]
        assert_same_row(together[i], alone)
        assert all(cam.shape == (14, 14) for cam in together[i].maps.values())


# ------------------------------------------------------------------- layouts on a tiny ViT


def test_token_layers_are_listed_with_their_grid(
    tiny_vit: nn.Module, make_engine: Callable[..., CamEngine]
) -> None:
    specs = {spec.name: spec for spec in make_engine(tiny_vit).layers((32, 32))}
    assert specs["patch_embed.proj"] == LayerSpec("patch_embed.proj", (32, 4, 4), "nchw")
    assert specs["patch_embed"] == LayerSpec("patch_embed", (32, 4, 4), "tokens")  # no prefix yet
    assert specs["blocks.1.norm1"] == LayerSpec("blocks.1.norm1", (32, 4, 4), "tokens")
    assert specs["blocks.1.mlp.fc1"] == LayerSpec("blocks.1.mlp.fc1", (128, 4, 4), "tokens")
    # Attention's (N, heads, tokens, head_dim) tensors fit no grid of the input: read as NCHW,
    # as every 4-D output was before layouts, but never chosen by default.
    assert specs["blocks.1.attn.q_norm"].shape == (2, 19, 16)
    assert "head" not in specs


def test_class_token_head_defaults_to_the_last_blocks_first_norm(
    tiny_vit: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    """After the last block's attention only the class token reaches the head: the patch tokens
    of everything from there on get no gradient, and explaining them is refused."""
    engine = make_engine(tiny_vit)
    assert engine.default_layer((32, 32)) == "blocks.1.norm1"
    batch = random_images(2, (32, 32))
    for layer in ("blocks.1", "norm", "blocks.1.attn.proj", "blocks.1.norm2"):
        with pytest.raises(LayerError) as caught:
            engine.explain_batch(batch, [RowRequest(layer)] * 2)
        message = str(caught.value)
        assert f"layer {layer!r}: its patch tokens receive no gradient from the logits" in message
        assert "'blocks.1.norm1' (the default)" in message
    results = engine.explain_batch(batch, [RowRequest("blocks.0")] * 2)  # before the last attention
    assert all(float(cam.max()) > 0 for r in results for cam in r.maps.values())


def test_mean_pooled_head_defaults_to_the_last_block(make_engine: Callable[..., CamEngine]) -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        reg_tokens=1,
        class_token=False,
        global_pool="avg",
        num_classes=10,
    ).eval()
    engine = make_engine(model)
    # `norm` is an Identity here (the head normalises after pooling), so the blocks come last.
    assert type(model.norm) is nn.Identity
    assert engine.default_layer((32, 32)) == "blocks"
    assert LayerSpec("blocks.1", (32, 4, 4), "tokens") in engine.layers((32, 32))


class _Patchify(nn.Module):
    """Cuts (N, 3, H, W) into 4x4 patches in row-major order: (N, H/4 * W/4, 48), no convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // 4) * (w // 4), c * 16)


class _RectangularTokens(nn.Module):
    """Tokens from a reshape, 7x14 of them at 28x56 (98: no square within 16 of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.patchify = _Patchify()
        self.embed = nn.Linear(48, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(torch.relu(self.embed(self.patchify(x))))
        return self.head(tokens.mean(dim=1))


def test_sequences_without_a_grid_are_refused_until_configured(
    make_engine: Callable[..., CamEngine], random_images: Callable[..., torch.Tensor]
) -> None:
    torch.manual_seed(0)
    model = _RectangularTokens().eval()
    batch = random_images(2, (28, 56))
    with pytest.raises(LayerError) as caught:
        make_engine(model).explain_batch(batch, [RowRequest("mix")] * 2)
    message = str(caught.value)
    assert "outputs a sequence of 98 tokens of width 16 that does not split" in message
    assert "Set `token_grid = [h, w]` and `prefix_tokens = P`" in message

    configured = make_engine(model, layouts=LayoutHints(token_grid=(7, 14), prefix_tokens=0))
    assert LayerSpec("mix", (16, 7, 14), "tokens") in configured.layers((28, 56))
    assert configured.default_layer((28, 56)) == "mix"
    results = configured.explain_batch(batch, [RowRequest("mix", PASS_METHODS, classes=(2,))] * 2)
    expected = reference_maps(model, "mix", vit_reshape(0, 7, 14), batch, [2, 2])
    for method in PASS_METHODS:
        assert_maps_match_reference(results, method, 2, (28, 56), expected[method])


class _ChannelsLastNet(nn.Module):
    """A stage that runs NHWC and whose shape reads both ways: (N, 8, 8, 8) at 32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.stem(x).permute(0, 2, 3, 1))
        return self.head(features.mean(dim=(1, 2)))


def test_an_ambiguous_channels_last_layer_follows_the_override(
    make_engine: Callable[..., CamEngine], random_images: Callable[..., torch.Tensor]
) -> None:
    torch.manual_seed(0)
    model = _ChannelsLastNet().eval()
    detected = {s.name: s for s in make_engine(model).layers((32, 32))}
    assert detected["norm"].layout == "nchw"  # (8, 8, 8) reads both ways; NCHW unless told
    engine = make_engine(model, layouts=LayoutHints(layers={"norm": "nhwc"}))
    assert LayerSpec("norm", (8, 8, 8), "nhwc") in engine.layers((32, 32))
    batch = random_images(2, (32, 32))
    results = engine.explain_batch(batch, [RowRequest("norm", PASS_METHODS, classes=(1,))] * 2)
    expected = reference_maps(model, "norm", swin_reshape(8, 8), batch, [1, 1])
    for method in PASS_METHODS:
        assert_maps_match_reference(results, method, 1, (32, 32), expected[method])


def test_layout_settings_are_checked(
    tiny_vit: nn.Module,
    make_engine: Callable[..., CamEngine],
    random_images: Callable[..., torch.Tensor],
) -> None:
    with pytest.raises(EngineError, match="layout 'nwhc' for layer 'norm' is unknown"):
        LayoutHints(layers={"norm": "nwhc"})
    with pytest.raises(EngineError, match="prefix_tokens must be an int >= 0"):
        LayoutHints(prefix_tokens=-1)
    with pytest.raises(EngineError, match=r"token_grid must be two ints >= 1"):
        LayoutHints(token_grid=(14, 0))
    with pytest.raises(EngineError, match="'blocks.9.norm1', which is not a module"):
        make_engine(tiny_vit, layouts=LayoutHints(layers={"blocks.9.norm1": "tokens"}))
    engine = make_engine(tiny_vit, layouts=LayoutHints(layers={"patch_embed.proj": "tokens"}))
    with pytest.raises(LayerError, match="is configured as 'tokens' in `layer_layouts` but"):
        engine.explain_batch(random_images(1, (32, 32)), [RowRequest("patch_embed.proj")])
