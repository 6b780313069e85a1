"""AblationCAM and ScoreCAM as forward-only rows after the explain pass, in chunks.

Both need one extra model row per channel of the target layer, so a runtime must be able to
spread them over many batches, interleave them with other work and stop between chunks. The
steps, in the order a runtime calls them:

1. `CamEngine.explain_batch` with `RowRequest(keep_activations=True)` (and the row's other methods):
   predictions, classes, maps of the single-pass methods, and `RowResult.retained`, the
   image and layer output of each explained copy (six with aug_smooth), on the engine's device.
2. `follow_ups(result, method)`: one `FollowUp` per retained copy; it holds the (K, C) score
   table to fill. `pieces(follow_up, chunk_rows)` cuts its channels into ranges.
3. `run_pieces(engine, batch)` for batches of pieces that share `FollowUp.key` (`pack` groups
   them; pieces of different images and requests may share a batch): builds the rows
   (`FollowUp.rows`), runs them (`CamEngine.predict_tail` for AblationCAM,
   `CamEngine.predict` for ScoreCAM) and records their scores. This is the only step that runs
   the model; it belongs on the engine's worker thread.
4. `merge(result, method, follow_ups, input_hw)` once every piece has run: the maps,
   (method, class) -> map, smoothed over the copies when the row asked for aug_smooth.

`explain_all` does all four synchronously, for tests, benchmarks and scripts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from camserve.server.engine.augment import smooth_maps
from camserve.server.engine.registry import NAMES, ROW_METHODS, ChannelRows, Method
from camserve.server.engine.registry import method as registered
from camserve.server.engine.types import (
    EngineError,
    LayerError,
    Retained,
    RowRequest,
    RowResult,
)

if TYPE_CHECKING:
    from camserve.server.engine.core import CamEngine

DEFAULT_CHUNK_ROWS = 64


@dataclass(eq=False)
class FollowUp:
    """One gradient-free method on one explained copy of an image: its rows and their scores."""

    method: str
    layer: str
    retained: Retained
    classes: tuple[int, ...]
    eigen_smooth: bool = False
    scores: torch.Tensor = field(init=False, repr=False)  # (K, C) logits; NaN until scored

    def __post_init__(self) -> None:
        entry = registered(self.method)
        if entry.rows is None:
            raise EngineError(
                f"method {self.method!r} is made by the explain pass, not by rows after it; "
                f"use one of {ROW_METHODS}"
            )
        if not entry.accepts(self.retained.layout):
            raise LayerError(
                f"{self.method} cannot explain layer {self.layer!r}, whose output is laid out "
                f"{self.retained.layout!r}; it takes layers laid out {sorted(entry.layouts)}"
            )
        self.entry: Method = entry
        self.work: ChannelRows = entry.rows
        self.scores = torch.full((len(self.classes), self.channels), math.nan)

    @property
    def channels(self) -> int:
        return int(self.retained.activation.shape[0])

    @property
    def key(self) -> tuple[object, ...]:
        """Pieces with equal keys can share one model call: same method and input size and,
        for the tail, same layer (rows of the whole model are plain inputs, whatever the
        layer)."""
        size = tuple(self.retained.image.shape[-2:])
        if self.entry.runs_tail:
            return (self.method, size, self.layer)
        return (self.method, size)

    @property
    def done(self) -> bool:
        return not bool(torch.isnan(self.scores).any())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The model rows for channels [start, stop), on the engine's device."""
        return self.work.build(self.retained.image, self.retained.activation, start, stop)

    def record(self, start: int, stop: int, logits: torch.Tensor) -> None:
        """Keeps the explained classes' logits (stop - start, num_classes) of those rows."""
        if logits.shape[0] != stop - start:
            raise EngineError(f"got {logits.shape[0]} logit rows for channels [{start}, {stop})")
        self.scores[:, start:stop] = logits[:, list(self.classes)].T.float().cpu()

    def maps(self) -> torch.Tensor:
        """The raw maps (K, h, w), float32 on the CPU at feature resolution, once every channel
        has been scored."""
        if not self.done:
            missing = int(torch.isnan(self.scores).any(dim=0).sum())
            raise EngineError(f"{self.method}: {missing} channels are not scored yet; run them")
        original = self.retained.logits[list(self.classes)]
        activation = self.retained.activation
        maps = self.work.maps(activation, original, self.scores, self.eigen_smooth)
        return maps.float().cpu()


@dataclass(frozen=True)
class Piece:
    """Channels [start, stop) of one follow-up: stop - start model rows."""

    follow_up: FollowUp
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def follow_ups(result: RowResult, method: str, *, eigen_smooth: bool = False) -> list[FollowUp]:
    """The work of `method` for an explained row: one FollowUp per retained copy."""
    if not result.retained:
        raise EngineError(
            f"{method} needs the row's activations: explain it with keep_activations=True"
        )
    return [
        FollowUp(method, result.layer, retained, result.classes, eigen_smooth)
        for retained in result.retained
    ]


def pieces(follow_up: FollowUp, chunk_rows: int) -> list[Piece]:
    """The follow-up's channels cut into ranges of at most `chunk_rows`."""
    if chunk_rows < 1:
        raise EngineError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [
        Piece(follow_up, start, min(start + chunk_rows, follow_up.channels))
        for start in range(0, follow_up.channels, chunk_rows)
    ]


def pack(all_pieces: Sequence[Piece], max_rows: int) -> list[list[Piece]]:
    """Batches of at most `max_rows` rows, each of pieces with one key, in the given order
    within each key. A piece larger than `max_rows` gets a batch of its own."""
    batches: list[list[Piece]] = []
    open_batches: dict[tuple[object, ...], list[Piece]] = {}
    for piece in all_pieces:
        key = piece.follow_up.key
        current = open_batches.get(key)
        if current is not None and sum(p.rows for p in current) + piece.rows > max_rows:
            current = None
        if current is None:
            current = []
            batches.append(current)
            open_batches[key] = current
        current.append(piece)
    return batches


def distinct_images(sources: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
    """For groups of rows given as (their input image, how many rows): the distinct images
    stacked once, and each row's index into them, as `CamEngine.predict_tail` takes them."""
    slots: dict[int, int] = {}
    images: list[torch.Tensor] = []
    index: list[int] = []
    for image, rows in sources:
        if id(image) not in slots:
            slots[id(image)] = len(images)
            images.append(image)
        index += [slots[id(image)]] * rows
    return torch.stack(images), index


def run_pieces(engine: CamEngine, batch: Sequence[Piece]) -> None:
    """Runs one batch of pieces through the model and records their scores."""
    if not batch:
        return
    keys = {piece.follow_up.key for piece in batch}
    if len(keys) != 1:
        raise EngineError(f"a batch of pieces must share one key, got {sorted(map(str, keys))}")
    rows = torch.cat([piece.follow_up.rows(piece.start, piece.stop) for piece in batch])
    first = batch[0].follow_up
    if first.entry.runs_tail:
        images, image_index = distinct_images(
            [(piece.follow_up.retained.image, piece.rows) for piece in batch]
        )
        logits = engine.predict_tail(first.layer, rows, images, image_index)
    else:
        logits = engine.predict(rows)
    offset = 0
    for piece in batch:
        piece.follow_up.record(piece.start, piece.stop, logits[offset : offset + piece.rows])
        offset += piece.rows


def merge(
    result: RowResult, method: str, done: Sequence[FollowUp], input_hw: tuple[int, int]
) -> dict[tuple[str, int], torch.Tensor]:
    """(method, class) -> map for an explained row: the raw (h, w) map at feature resolution,
    or with aug_smooth (several copies) the smoothed (H, W) map, like `RowResult.maps`."""
    if len(done) != len(result.retained) or not done:
        raise EngineError(
            f"{method}: got {len(done)} follow-ups for {len(result.retained)} retained copies"
        )
    augmentations = [f.retained.augmentation for f in done]
    if len(done) == 1 and augmentations[0] is None:
        maps = done[0].maps()
    else:
        steps = [a for a in augmentations if a is not None]
        if len(steps) != len(done):
            raise EngineError(f"{method}: copies without their augmentation cannot be smoothed")
        maps = smooth_maps([f.maps() for f in done], steps, input_hw)
    return {(method, c): maps[k] for k, c in enumerate(result.classes)}


def _split_methods(index: int, row: RowRequest) -> tuple[tuple[str, ...], tuple[str, ...]]:
    methods = tuple(row.methods)
    for name in methods:
        if name not in NAMES:
            raise EngineError(
                f"rows[{index}].methods: unknown method {name!r}; choose from {NAMES}"
            )
    if len(set(methods)) != len(methods):
        raise EngineError(f"rows[{index}].methods lists a method twice: {methods!r}")
    single = tuple(m for m in methods if registered(m).produces.from_pass)
    free = tuple(m for m in methods if not registered(m).produces.from_pass)
    return single, free


def explain_all(
    engine: CamEngine,
    batch: torch.Tensor,
    rows: Sequence[RowRequest],
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> list[RowResult]:
    """`CamEngine.explain_batch` for rows whose methods may include the gradient-free ones, run
    to the end synchronously: follow-up rows in batches of at most `chunk_rows`, packed across
    images."""
    split = [_split_methods(i, row) for i, row in enumerate(rows)]
    asked = [
        dataclasses.replace(
            row, methods=single, keep_activations=row.keep_activations or bool(free)
        )
        for row, (single, free) in zip(rows, split, strict=True)
    ]
    results = engine.explain_batch(batch, asked)
    input_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
    work: list[tuple[int, str, list[FollowUp]]] = []
    for i, (row, (_, free)) in enumerate(zip(rows, split, strict=True)):
        for name in free:
            work.append((i, name, follow_ups(results[i], name, eigen_smooth=row.eigen_smooth)))
    every_piece = [piece for _, _, group in work for f in group for piece in pieces(f, chunk_rows)]
    for chunk in pack(every_piece, chunk_rows):
        run_pieces(engine, chunk)
    maps: list[dict[tuple[str, int], torch.Tensor]] = [dict(r.maps) for r in results]
    for i, method, group in work:
        maps[i].update(merge(results[i], method, group, input_hw))
    return [
        dataclasses.replace(
            result, maps=maps[i], retained=result.retained if row.keep_activations else ()
        )
        for i, (row, result) in enumerate(zip(rows, results, strict=True))
    ]
