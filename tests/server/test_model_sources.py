"""timm sources, input recipes and layout settings: from the TOML file to a loaded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from camserve.server.engine import LayoutHints
from camserve.server.models.loading import (
    ModelLoadError,
    build_model,
    input_recipe,
    layout_hints,
)
from camserve.server.preprocess import InputRecipe
from camserve.server.settings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSettings,
    SettingsError,
    load_settings,
)

DEIT = "timm:deit_tiny_distilled_patch16_224"

TOML = """
[[models]]
name = "vit"
source = "timm:deit_tiny_distilled_patch16_224"
weights = "deit.safetensors"
prefix_tokens = 2
token_grid = [14, 14]
layer_layouts = { "blocks.11.norm1" = "tokens", "patch_embed.proj" = "nchw" }
"""


def test_layout_keys_are_read_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "camserve.toml"
    config.write_text(TOML)
    (model,) = load_settings(["--config", str(config)], {}).models
    assert model.source == DEIT
    assert (model.prefix_tokens, model.token_grid) == (2, (14, 14))
    assert dict(model.layer_layouts) == {"blocks.11.norm1": "tokens", "patch_embed.proj": "nchw"}
    assert (model.resize, model.crop) == (None, None)  # the source's own
    assert layout_hints(model) == LayoutHints(
        layers={"blocks.11.norm1": "tokens", "patch_embed.proj": "nchw"},
        prefix_tokens=2,
        token_grid=(14, 14),
    )
    assert layout_hints(ModelSettings(name="m", source="torchvision:resnet18")) == LayoutHints()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('layer_layouts = { "norm" = "nwhc" }', "layer_layouts['norm']='nwhc': use one of nchw"),
        ('layer_layouts = "nhwc"', "layer_layouts must be a table of layer = layout"),
        ("prefix_tokens = -2", "prefix_tokens=-2: use -1 (taken from the model) or the number"),
        ("token_grid = [14]", "token_grid=[14]: use [height, width] of the patch grid"),
        ("token_grid = [14, 0]", "token_grid=[14, 0]"),
        ("crop = 300\nresize = 256", "resize must be 0 or at least crop (300)"),
    ],
)
def test_bad_layout_settings_name_the_key(tmp_path: Path, entry: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f"[[models]]\nname = 'm'\nsource = '{DEIT}'\n{entry}\n")
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(["--config", str(config)], {})


def test_timm_source_needs_weights_and_a_known_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="timm sources need `weights`"):
        build_model(ModelSettings(name="m", source=DEIT))
    misspelt = "timm:deit_tiny_distiled_patch16_224"
    spec = ModelSettings(name="m", source=misspelt, weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="did you mean deit_tiny_distilled_patch16_224"):
        build_model(spec)


def test_timm_model_from_safetensors_with_timms_input_recipe(deit_weights: Path) -> None:
    spec = ModelSettings(name="deit", source=DEIT, weights=str(deit_weights))
    model = build_model(spec)
    torch.manual_seed(0)
    import timm

    expected = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # timm's evaluation transform: shorter side to floor(224 / 0.9), centre crop 224, ImageNet
    # statistics (DeiT's pretrained config).
    assert input_recipe(spec, model) == InputRecipe(248, 224, IMAGENET_MEAN, IMAGENET_STD)
    # What the configuration sets wins; an unset resize is at least the crop.
    custom = ModelSettings(name="deit", source=DEIT, crop=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert input_recipe(custom, model) == InputRecipe(256, 256, (0.5,) * 3, (0.5,) * 3)


def test_other_sources_keep_their_recipe(resnet18_weights: Path) -> None:
    spec = ModelSettings(name="r", source="torchvision:resnet18", weights=str(resnet18_weights))
    model = build_model(spec)
    assert input_recipe(spec, model) == InputRecipe(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    straight = ModelSettings(name="r", source="torchvision:resnet18", resize=0, crop=160)
    assert input_recipe(straight, model) == InputRecipe(0, 160, IMAGENET_MEAN, IMAGENET_STD)
