"""Builds a model's `nn.Module` from its configured source, loading weights safely, and the
settings that go with it: its input recipe and its layer layouts.

Weights are never unpickled: `.pt`/`.pth` files go through `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers, and `.safetensors` files through safetensors.
torchvision and timm architectures are built without pretrained weights (nothing is downloaded)
and then given the configured state dict.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camserve.server.engine.layouts import LayoutHints
from camserve.server.models.builtin import BUILTINS, LITE_MEAN, LITE_STD
from camserve.server.records import InputRecipe
from camserve.server.settings import (
    DEFAULT_CROP,
    DEFAULT_RESIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSettings,
)


class ModelLoadError(RuntimeError):
    """A model that cannot be built or whose weights cannot be loaded; says which and why."""


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads a state dict from `.safetensors` or a `.pt`/`.pth` file, never running pickled code."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path} is not a plain state dict and was refused unread (it would have to run "
            f"pickled code): {str(exc).splitlines()[0]}. Save weights with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors")
    return state


def _classes_in(state: dict[str, torch.Tensor]) -> int:
    """The output size of the last 2-D weight: the classifier's class count."""
    for key, value in reversed(list(state.items())):
        if key.endswith("weight") and value.dim() == 2:
            return int(value.shape[0])
    raise ModelLoadError("cannot infer num_classes from the weights; set num_classes")


def _apply_weights(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSettings) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model {spec.name!r}: weights {spec.weights} do not fit {spec.source}: {exc}"
        ) from None


def normalisation(spec: ModelSettings) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The configured mean/std, else the source's own: the builtin's training recipe, or
    ImageNet's statistics, which torchvision's classifiers and most fine-tunes of them use."""
    if spec.mean and spec.std:
        return spec.mean, spec.std
    if spec.source.startswith("builtin:"):
        return LITE_MEAN, LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    config: dict[str, Any] = resolve_model_data_config(model)
    return config


def input_recipe(spec: ModelSettings, model: nn.Module) -> InputRecipe:
    """How inputs are made for `model`: what `spec` sets, the source's own recipe for the rest.

    timm sources take their input size, crop fraction, mean and std from the model's pretrained
    config, as timm's own evaluation transform does (shorter side resized to
    floor(size / crop_pct), then the centre crop); the others resize to 256 and crop 224, with
    `normalisation(spec)`. Resampling is always bilinear.
    """
    mean, std = normalisation(spec)
    resize, crop = DEFAULT_RESIZE, DEFAULT_CROP
    if spec.source.startswith("timm:"):
        config = _timm_data_config(model)
        height, width = (int(side) for side in config["input_size"][-2:])
        if height != width and spec.crop is None:
            raise ModelLoadError(
                f"model {spec.name!r}: timm's input size for it is {height}x{width}, but camserve "
                "crops squares; set `crop` (and `resize`) in its [[models]] entry"
            )
        crop = height
        resize = math.floor(crop / float(config.get("crop_pct") or 1.0))
        if not (spec.mean and spec.std):
            mean = tuple(float(v) for v in config["mean"])
            std = tuple(float(v) for v in config["std"])
    crop = spec.crop if spec.crop is not None else crop
    resize = spec.resize if spec.resize is not None else max(resize, crop)
    if resize and resize < crop:
        raise ModelLoadError(f"model {spec.name!r}: resize must be 0 or at least crop ({crop})")
    return InputRecipe(resize=resize, crop=crop, mean=mean, std=std)


def layout_hints(spec: ModelSettings) -> LayoutHints:
    """The layout settings of `spec` as the engine takes them; unset ones are detected."""
    return LayoutHints(
        layers=dict(spec.layer_layouts),
        prefix_tokens=spec.prefix_tokens if spec.prefix_tokens >= 0 else None,
        token_grid=(spec.token_grid[0], spec.token_grid[1]) if spec.token_grid else None,
    )


def _timm_model(spec: ModelSettings, name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelLoadError(
            f"model {spec.name!r}: timm sources need the timm package; install "
            "'camserve[timm]' (or pip install timm)"
        ) from None
    if not spec.weights:
        raise ModelLoadError(
            f"model {spec.name!r}: timm sources need `weights` (a local state dict or "
            ".safetensors file); nothing is downloaded at run time"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown timm architecture {name!r} (see timm.list_models()){hint}")
    state = load_state_dict(spec.weights)
    num_classes = spec.num_classes or _classes_in(state)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    _apply_weights(model, state, spec)
    return model


def build_model(spec: ModelSettings) -> nn.Module:
    """The module described by `spec`, with its weights loaded, on the CPU."""
    kind, _, target = spec.source.partition(":")
    if kind == "builtin":
        if target not in BUILTINS:
            raise ModelLoadError(f"unknown builtin model {target!r}; builtins: {sorted(BUILTINS)}")
        return BUILTINS[target]()
    if kind == "timm":
        return _timm_model(spec, target)
    if kind == "torchvision":
        import torchvision

        if not spec.weights:
            raise ModelLoadError(
                f"model {spec.name!r}: torchvision sources need `weights` (a local state dict); "
                "nothing is downloaded at run time"
            )
        state = load_state_dict(spec.weights)
        num_classes = spec.num_classes or _classes_in(state)
        try:
            model = torchvision.models.get_model(target, weights=None, num_classes=num_classes)
        except ValueError:
            known = ", ".join(sorted(torchvision.models.list_models(torchvision.models))[:12])
            raise ModelLoadError(
                f"unknown torchvision architecture {target!r}; e.g. {known}, ..."
            ) from None
        _apply_weights(model, state, spec)
        return model
    module_name, _, function_name = target.rpartition(":")
    if not module_name or not function_name:
        raise ModelLoadError(
            f"factory source {spec.source!r} must read factory:package.module:function"
        )
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import factory {target!r}: {exc}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {target!r} returned {type(model).__name__}, not nn.Module")
    if spec.weights:
        _apply_weights(model, load_state_dict(spec.weights), spec)
    return model
