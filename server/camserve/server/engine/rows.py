"""Checks on what a batch asks for, and which classes each row explains.

The servicer validates requests before they reach the engine, but the engine does not rely on
it: every check here raises `EngineError` naming the row, the argument and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from camserve.server.engine.types import METHODS, EngineError, RowRequest


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
    if isinstance(row.methods, str) or not row.methods:
        raise EngineError(
            f"{where}.methods must be a non-empty tuple of method names from {METHODS}, "
            f"got {row.methods!r}"
        )
    for method in row.methods:
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
