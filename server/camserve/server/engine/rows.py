"""Checks on what a batch asks for, and which classes each row explains.

The servicer validates requests before they reach the engine, but the engine does not rely on
it: every check here raises `EngineError` naming the row, the argument and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camserve.server.engine.types import (
    GRADIENT_FREE_METHODS,
    METHODS,
    EngineError,
    RowRequest,
)


def check_images(batch: object) -> torch.Tensor:
    """The batch, once checked to be an (N, C, H, W) floating tensor with N >= 1."""
    if not isinstance(batch, torch.Tensor):
        raise EngineError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dim() != 4 or batch.shape[0] == 0:
        raise EngineError(
            f"batch must be (N, 3, H, W) with N >= 1, got shape {tuple(batch.shape)}; stack "
            "preprocessed images with torch.stack"
        )
    if not batch.is_floating_point():
        raise EngineError(f"batch must be a float tensor, got {batch.dtype}; normalise it first")
    return batch


def check_batch(batch: object, rows: Sequence[RowRequest]) -> torch.Tensor:
    """The batch, once checked to be (N, C, H, W) floating with one RowRequest per image."""
    images = check_images(batch)
    if len(rows) != images.shape[0]:
        raise EngineError(
            f"rows has {len(rows)} entries but batch holds {images.shape[0]} images; pass one "
            "RowRequest per image"
        )
    return images


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_row(index: int, row: RowRequest) -> None:
    """Checks that need no model: types, method names, duplicates, obvious bounds."""
    where = f"rows[{index}]"
    if not isinstance(row, RowRequest):
        raise EngineError(f"{where} must be a RowRequest, got {type(row).__name__}")
    if not isinstance(row.layer, str) or not row.layer:
        raise EngineError(
            f"{where}.layer must be a module name such as 'layer4', got {row.layer!r}; "
            "CamEngine.default_layer() gives a sensible one"
        )
    for flag in ("eigen_smooth", "aug_smooth", "keep_activations"):
        if not isinstance(getattr(row, flag), bool):
            raise EngineError(f"{where}.{flag} must be True or False, got {getattr(row, flag)!r}")
    if isinstance(row.methods, str) or not (row.methods or row.keep_activations):
        raise EngineError(
            f"{where}.methods must be a non-empty tuple of method names from {METHODS} (empty "
            f"only with keep_activations=True), got {row.methods!r}"
        )
    for method in row.methods:
        if method in GRADIENT_FREE_METHODS:
            raise EngineError(
                f"{where}.methods: {method!r} is gradient-free and needs forward-only rows after "
                "the explain pass; ask explain for keep_activations=True and run it with "
                "camserve.server.engine.gradient_free (explain_all does both)"
            )
        if method not in METHODS:
            raise EngineError(f"{where}.methods: unknown method {method!r}; choose from {METHODS}")
    if len(set(row.methods)) != len(row.methods):
        raise EngineError(f"{where}.methods lists a method twice: {row.methods!r}; list each once")
    if isinstance(row.classes, (str, bytes)) or not all(_is_int(c) for c in row.classes):
        raise EngineError(
            f"{where}.classes must be a tuple of int class indices, got {row.classes!r}"
        )
    if any(c < 0 for c in row.classes):
        raise EngineError(f"{where}.classes must be >= 0, got {row.classes!r}")
    if len(set(row.classes)) != len(row.classes):
        raise EngineError(f"{where}.classes lists a class twice: {row.classes!r}; list each once")
    if not _is_int(row.top_k) or row.top_k < 1:
        raise EngineError(f"{where}.top_k must be an int >= 1, got {row.top_k!r}")


def resolve_classes(index: int, row: RowRequest, logits: torch.Tensor) -> tuple[int, ...]:
    """The classes row `index` explains: its explicit classes, else its top_k predictions."""
    num_classes = int(logits.shape[-1])
    where = f"rows[{index}]"
    if row.classes:
        bad = [c for c in row.classes if c >= num_classes]
        if bad:
            raise EngineError(
                f"{where}.classes: {bad} out of range; this model has {num_classes} classes "
                f"(0..{num_classes - 1})"
            )
        return tuple(row.classes)
    if row.top_k > num_classes:
        raise EngineError(
            f"{where}.top_k is {row.top_k} but this model has only {num_classes} classes; "
            f"use 1..{num_classes}"
        )
    return tuple(int(c) for c in torch.topk(logits, row.top_k).indices.tolist())


def check_activations(activations: object) -> int:
    """The number of rows of `activations`, once checked to be a floating (R, C, h, w) tensor."""
    if not isinstance(activations, torch.Tensor):
        raise EngineError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    if activations.dim() != 4 or activations.shape[0] == 0:
        raise EngineError(
            f"activations must be (R, C, h, w) with R >= 1, got shape {tuple(activations.shape)}; "
            "stack the target layer's outputs (RowResult.retained) with torch.stack"
        )
    if not activations.is_floating_point():
        raise EngineError(f"activations must be a float tensor, got {activations.dtype}")
    return int(activations.shape[0])


def row_images(image_index: Sequence[int] | None, rows: int, images: int) -> list[int]:
    """Which of `images` input images each of `rows` rows came from."""
    if image_index is None:
        if images == rows:
            return list(range(rows))
        if images == 1:
            return [0] * rows
        raise EngineError(
            f"images holds {images} images for {rows} rows; pass one image per row, a single "
            "shared image, or image_index naming each row's image"
        )
    index = list(image_index)
    if len(index) != rows:
        raise EngineError(
            f"image_index has {len(index)} entries for {rows} rows; give one image index per row"
        )
    if not all(_is_int(i) and 0 <= i < images for i in index):
        raise EngineError(
            f"image_index entries must be ints in 0..{images - 1} (images holds {images}), "
            f"got {index}"
        )
    return index
