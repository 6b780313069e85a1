"""Checks on what a batch asks for, which classes each row explains, which rows share a method.

The servicer validates requests before they reach the engine, but the engine does not rely on
it: every check here raises `EngineError` naming the row, the argument and the fix.

Class choice is planned on the host from the requests alone (`plan_classes`) and carried out on
the device (`pick_classes`), so that choosing top-k classes never waits for the logits to reach
the host; the range checks need only the logits' shape (`check_classes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camserve.server.engine.registry import BY_NAME, PASS_METHODS, PIXEL_PASS_METHODS
from camserve.server.engine.saliency import REDUCTIONS
from camserve.server.engine.types import EngineError, RowRequest


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
    _check_methods(where, row)
    _check_classes(where, row)


_BY_PASS = PASS_METHODS + PIXEL_PASS_METHODS


def _check_methods(where: str, row: RowRequest) -> None:
    for flag in ("eigen_smooth", "aug_smooth", "keep_activations"):
        if not isinstance(getattr(row, flag), bool):
            raise EngineError(f"{where}.{flag} must be True or False, got {getattr(row, flag)!r}")
    if isinstance(row.methods, str) or not (row.methods or row.keep_activations or row.inspection):
        raise EngineError(
            f"{where}.methods must be a non-empty tuple of method names from {_BY_PASS} (empty "
            f"only with keep_activations=True or an inspection), got {row.methods!r}"
        )
    for method in row.methods:
        entry = BY_NAME.get(method) if isinstance(method, str) else None
        if entry is None:
            raise EngineError(f"{where}.methods: unknown method {method!r}; choose from {_BY_PASS}")
        if not entry.produces.from_pass:
            raise EngineError(
                f"{where}.methods: {method!r} needs {entry.produces.value}, run after the explain "
                "pass; ask explain for keep_activations=True and run it with "
                "camserve.server.engine.gradient_free (explain_all does both)"
            )
    if row.reduction and row.reduction not in REDUCTIONS:
        raise EngineError(
            f"{where}.reduction must be one of {REDUCTIONS} or empty, got {row.reduction!r}"
        )
    if row.aug_smooth and any(BY_NAME[m].pixel is not None for m in row.methods):
        raise EngineError(
            f"{where}: aug_smooth averages layer maps; pixel attributions take no aug_smooth "
            "(noisy copies after the pass are their smoothing)"
        )
    if len(set(row.methods)) != len(row.methods):
        raise EngineError(f"{where}.methods lists a method twice: {row.methods!r}; list each once")


def _check_classes(where: str, row: RowRequest) -> None:
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


def check_classes(index: int, row: RowRequest, num_classes: int) -> None:
    """Row `index`'s classes, or its top_k, fit a model with `num_classes` logits.

    Needs only the logits' shape, so it runs before anything has to be read from the device.
    """
    where = f"rows[{index}]"
    if row.classes:
        bad = [c for c in row.classes if c >= num_classes]
        if bad:
            raise EngineError(
                f"{where}.classes: {bad} out of range; this model has {num_classes} classes "
                f"(0..{num_classes - 1})"
            )
    elif row.top_k > num_classes:
        raise EngineError(
            f"{where}.top_k is {row.top_k} but this model has only {num_classes} classes; "
            f"use 1..{num_classes}"
        )


@dataclass(frozen=True)
class ClassPlan:
    """Which classes each row of a batch explains, as index tensors, so that the device can pick
    them and build the grad outputs without asking the host for anything.

    Row i explains `counts[i]` classes: its explicit classes, or the top `counts[i]` of its class
    source's logits. Position k of row i is `explicit[k, i]` when that is >= 0, else the k-th
    class of `top[top_slot[i]]` where `top` ranks the logits of the `top_rows` (one
    `torch.topk` of `top_k` classes for the whole batch). Positions k >= counts[i] are padding:
    class 0, `valid` False, a zero grad output.
    """

    counts: tuple[int, ...]
    explicit: torch.Tensor  # (depth, N) int64
    valid: torch.Tensor  # (depth, N) bool
    top_rows: torch.Tensor  # (T,) int64
    top_slot: torch.Tensor  # (N,) int64
    top_k: int  # 0 when no row ranks its logits

    @property
    def depth(self) -> int:
        return max(self.counts)

    def tensors(self) -> list[torch.Tensor]:
        """The index tensors, in the order `with_tensors` takes them back."""
        return [self.explicit, self.valid, self.top_rows, self.top_slot]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> ClassPlan:
        """The same plan with its index tensors replaced (by their copies on the device)."""
        explicit, valid, top_rows, top_slot = tensors
        return dataclasses.replace(
            self, explicit=explicit, valid=valid, top_rows=top_rows, top_slot=top_slot
        )


def plan_classes(rows: Sequence[RowRequest], class_source: Sequence[int]) -> ClassPlan:
    """The plan for `rows`, where row i takes its classes from row `class_source[i]` (itself, or
    the identity copy of an aug_smooth image). Host-side only: it reads no logits."""
    counts = tuple(len(rows[s].classes) or rows[s].top_k for s in class_source)
    depth = max(counts)
    ranked = list(dict.fromkeys(s for s in class_source if not rows[s].classes))
    slot = {source: position for position, source in enumerate(ranked)}
    explicit: list[list[int]] = []  # per row, transposed below
    top_slot: list[int] = []
    for source, count in zip(class_source, counts, strict=True):
        wanted = rows[source].classes
        explicit.append([*(wanted or [-1] * count), *[0] * (depth - count)])
        top_slot.append(0 if wanted else slot[source])
    positions = torch.arange(depth)[:, None]
    return ClassPlan(
        counts=counts,
        explicit=torch.tensor(explicit, dtype=torch.int64).T.contiguous(),
        valid=positions < torch.tensor(counts)[None, :],
        top_rows=torch.tensor(ranked, dtype=torch.int64),
        top_slot=torch.tensor(top_slot, dtype=torch.int64),
        top_k=max((rows[s].top_k for s in ranked), default=0),
    )


def pick_classes(plan: ClassPlan, scores: torch.Tensor) -> torch.Tensor:
    """(depth, N) int64 class indices on the scores' device, `plan`'s tensors being there too:
    the explicit ones, and the top-k ones from one `torch.topk` over the rows that rank."""
    if plan.top_k == 0:
        return plan.explicit
    top = torch.topk(scores.index_select(0, plan.top_rows), plan.top_k).indices  # (T, k)
    per_row = top.index_select(0, plan.top_slot).T  # (k, N)
    missing = plan.depth - plan.top_k
    if missing:
        per_row = torch.cat([per_row, per_row.new_zeros((missing, per_row.shape[1]))])
    return torch.where(plan.explicit < 0, per_row, plan.explicit)


@dataclass(frozen=True)
class MapGroup:
    """Rows of one layer asking for one method with one eigen_smooth setting: one tensor op."""

    layer: str
    method: str
    eigen_smooth: bool
    rows: tuple[int, ...]
    reduction: str = ""  # pixel methods: the rows' channel reduction (empty: the method's own)


def _options(row: RowRequest, method: str) -> tuple[bool, str]:
    """What besides the method splits rows into groups: eigen_smooth, a pixel reduction."""
    return row.eigen_smooth, row.reduction if BY_NAME[method].pixel is not None else ""


def map_groups(rows: Sequence[RowRequest], layers: Sequence[str]) -> list[MapGroup]:
    """Every (layer, method, eigen_smooth, reduction) some row asks for, with its rows."""
    groups: list[MapGroup] = []
    for layer in layers:
        on_layer = [i for i, row in enumerate(rows) if row.layer == layer]
        asked = dict.fromkeys((m, *_options(rows[i], m)) for i in on_layer for m in rows[i].methods)
        for method, eigen_smooth, reduction in asked:
            wanted = tuple(
                i
                for i in on_layer
                if method in rows[i].methods
                and _options(rows[i], method) == (eigen_smooth, reduction)
            )
            groups.append(MapGroup(layer, method, eigen_smooth, wanted, reduction))
    return groups


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
