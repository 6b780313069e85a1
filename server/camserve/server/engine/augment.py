"""aug_smooth: explain augmented copies of an image and average their maps.

pytorch-grad-cam's test-time augmentation (ttach's `HorizontalFlip` x `Multiply([0.9, 1, 1.1])`):
six copies of each image, every combination of flipped or not and brightness factor 0.9, 1 or
1.1, in ttach's order (`AUGMENTATIONS`). Each copy is explained on its own; its map is brought to
the input size, min-max normalised, flipped back, and the six are averaged. The mean is not
normalised again, as in pytorch-grad-cam, so it lies in [0, 1] without spanning it.

Classes: every copy explains the classes chosen for the un-augmented image (the identity copy),
so the six maps of a class can be averaged; pytorch-grad-cam with `targets=None` would instead
let each copy explain its own top class.

Two layers of API:
- `augment_images` and `smooth_maps` are the building blocks: rows to explain, and the
  combination of their maps. A runtime uses them for gradient-free methods, whose maps come
  from follow-up rows per copy.
- `expand` / `collapse` apply them around one explain pass, so rows with and without aug_smooth
  share a batch; `CamEngine.explain_batch` calls them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camserve.server.engine.shaping import normalise, to_input
from camserve.server.engine.types import Augmentation, RowRequest, RowResult

AUGMENTATIONS: tuple[Augmentation, ...] = tuple(
    Augmentation(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)
)
IDENTITY_INDEX = AUGMENTATIONS.index(Augmentation(False, 1.0))


def apply(augmentation: Augmentation, images: torch.Tensor) -> torch.Tensor:
    """The augmented (..., 3, H, W) images: flipped left-right if asked, then scaled."""
    out = images.flip(-1) if augmentation.flip else images
    return out * augmentation.factor if augmentation.factor != 1.0 else out


def undo(augmentation: Augmentation, maps: torch.Tensor) -> torch.Tensor:
    """Maps (..., h, w) of an augmented image put back over the original: flipped back."""
    return maps.flip(-1) if augmentation.flip else maps


def augment_images(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (6, 3, H, W): the copies of one image, in `AUGMENTATIONS` order."""
    return torch.stack([apply(augmentation, image) for augmentation in AUGMENTATIONS])


def smooth_maps(
    maps: Sequence[torch.Tensor],
    augmentations: Sequence[Augmentation],
    input_hw: tuple[int, int],
) -> torch.Tensor:
    """The aug_smooth map (..., H, W) from each copy's raw maps (..., h, w), in the same order.

    Each copy's maps are upsampled to `input_hw`, normalised per map, flipped back; then averaged.
    """
    if len(maps) != len(augmentations) or not maps:
        raise ValueError(f"got {len(maps)} maps for {len(augmentations)} augmentations")
    total: torch.Tensor | None = None
    for copy_maps, augmentation in zip(maps, augmentations, strict=True):
        batch = copy_maps.reshape(-1, *copy_maps.shape[-2:])
        shaped = undo(augmentation, normalise(to_input(batch, input_hw)))
        total = shaped if total is None else total + shaped
    assert total is not None
    mean = total / len(maps)
    return mean.reshape(*maps[0].shape[:-2], *input_hw)


@dataclass(frozen=True)
class Expansion:
    """A batch with each aug_smooth row replaced by its six copies, and how to fold it back."""

    images: torch.Tensor  # (M, 3, H, W)
    rows: list[RowRequest]  # one per expanded row, aug_smooth cleared
    origin: list[int]  # expanded row -> index of the request row it came from
    class_source: list[int]  # expanded row -> expanded row whose logits choose its classes
    augmentation: list[Augmentation | None]  # expanded row -> its augmentation, if any

    @property
    def identity(self) -> bool:
        return all(a is None for a in self.augmentation)


def expand(images: torch.Tensor, rows: Sequence[RowRequest]) -> Expansion:
    """The batch to run: unchanged when no row asks for aug_smooth."""
    count = len(rows)
    if not any(row.aug_smooth for row in rows):
        return Expansion(images, list(rows), list(range(count)), list(range(count)), [None] * count)
    parts: list[torch.Tensor] = []
    out_rows: list[RowRequest] = []
    origin: list[int] = []
    source: list[int] = []
    augmentation: list[Augmentation | None] = []
    for index, row in enumerate(rows):
        start = len(out_rows)
        if row.aug_smooth:
            parts.append(augment_images(images[index]))
            plain = dataclasses.replace(row, aug_smooth=False, outputs=(), inspection=None)
            copies = [plain] * len(AUGMENTATIONS)
            copies[IDENTITY_INDEX] = dataclasses.replace(row, aug_smooth=False)  # its outputs
            out_rows += copies
            origin += [index] * len(AUGMENTATIONS)
            source += [start + IDENTITY_INDEX] * len(AUGMENTATIONS)
            augmentation += list(AUGMENTATIONS)
        else:
            parts.append(images[index : index + 1])
            out_rows.append(row)
            origin.append(index)
            source.append(start)
            augmentation.append(None)
    return Expansion(torch.cat(parts), out_rows, origin, source, augmentation)


def collapse(
    expansion: Expansion, results: Sequence[RowResult], input_hw: tuple[int, int]
) -> list[RowResult]:
    """One RowResult per request row: aug_smooth rows get the identity copy's predictions, the
    smoothed maps and every copy's `Retained`, tagged with its augmentation."""
    if expansion.identity:
        return list(results)
    groups: dict[int, list[int]] = {}
    for position, index in enumerate(expansion.origin):
        groups.setdefault(index, []).append(position)
    collapsed: list[RowResult] = []
    for index in sorted(groups):
        positions = groups[index]
        if len(positions) == 1 and expansion.augmentation[positions[0]] is None:
            collapsed.append(results[positions[0]])
            continue
        copies = [results[p] for p in positions]
        augmentations = [a for p in positions if (a := expansion.augmentation[p]) is not None]
        chosen = copies[IDENTITY_INDEX]
        keys = list(chosen.maps)
        maps: dict[tuple[str, int], torch.Tensor] = {}
        if keys:
            stacked = [torch.stack([copy.maps[key] for key in keys]) for copy in copies]
            smoothed = smooth_maps(stacked, augmentations, input_hw)
            maps = {key: smoothed[i] for i, key in enumerate(keys)}
        retained = tuple(
            dataclasses.replace(copy.retained[0], augmentation=augmentation)
            for copy, augmentation in zip(copies, augmentations, strict=True)
            if copy.retained
        )
        collapsed.append(dataclasses.replace(chosen, maps=maps, retained=retained))
    return collapsed
