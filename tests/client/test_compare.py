"""`camserve compare`'s bookkeeping without a server: means, the best method per score in the
right direction, and a method that failed on some images only. The stand-in `explain` returns
explanations parsed from hand-made v1 responses, as the server's would be."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve.client import compare
from camserve.client.errors import InvalidArgument
from camserve.client.results import explanations_from_response
from camserve.v1 import explain_pb2 as pb
from camserve.v1.methods import METHOD_BY_NAME
from camserve.v1.tensors import to_proto

# Per method, per image: (confidence_change, deletion_auc, insertion_auc).
SCORES = {
    "gradcam": [(-0.2, 0.30, 0.50), (-0.4, 0.10, 0.70)],  # means -0.3, 0.2, 0.6
    "eigencam": [(-0.1, 0.40, 0.40), (-0.1, 0.40, 0.40)],
    "layercam": [(-0.5, 0.05, 0.90), None],  # fails on the second image
}


def fake_explain(path: Path, *, methods: str, resolution: tuple[int, int], **_: object):
    index = int(path.stem)
    values = SCORES[methods][index]
    if values is None:
        raise InvalidArgument(
            "images[0].encoded: cannot decode", code=grpc.StatusCode.INVALID_ARGUMENT
        )
    heatmap = pb.Heatmap(
        method=METHOD_BY_NAME[methods],  # type: ignore[arg-type]
        class_index=1,
        data=to_proto(np.zeros(resolution, np.uint8)),
    )
    heatmap.confidence_change, heatmap.deletion_auc, heatmap.insertion_auc = values
    reply = pb.ExplainResponse(
        results=[
            pb.ImageResult(
                predictions=[pb.Prediction(index=1, label="b", probability=0.5)],
                heatmaps=[heatmap],
            )
        ]
    )
    (explanation,) = explanations_from_response(reply)
    return explanation


@pytest.fixture
def pictures(tmp_path: Path) -> list[compare.Picture]:
    paths = []
    for i, size in enumerate([(320, 160), (100, 200)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, "green").save(path)
        paths.append(path)
    return [compare.load_picture(path) for path in paths]


def test_thumbnails_fit_the_cell(pictures) -> None:
    assert [p.thumbnail_hw for p in pictures] == [(80, 160), (160, 80)]


def test_means_best_methods_and_partial_failures(pictures) -> None:
    results = compare.run(fake_explain, pictures, list(SCORES), scores=["deletion_auc"])
    by_method = {r.method: r for r in results}
    assert by_method["gradcam"].mean_score("confidence_change") == pytest.approx(-0.3)
    assert by_method["layercam"].mean_score("deletion_auc") == pytest.approx(0.05)
    assert not by_method["layercam"].refused
    assert len(by_method["layercam"].failures) == 1
    names = ["confidence_change", "deletion_auc", "insertion_auc"]
    assert compare.best_methods(results, names) == {
        "confidence_change": "eigencam",  # higher is better: the smallest drop
        "deletion_auc": "layercam",  # lower is better
        "insertion_auc": "layercam",  # higher is better
    }
    lines = compare.table(results, names)
    assert lines[0].split() == ["method", *names, "s/image"]
    assert lines[1].split()[:4] == ["gradcam", "-0.3000", "0.2000", "0.6000"]
    layercam = lines.index(next(line for line in lines if line.startswith("layercam")))
    assert lines[layercam + 1] == (
        "  1 of 2 images failed: INVALID_ARGUMENT: images[0].encoded: cannot decode"
    )
    assert lines[-3:] == [
        "best confidence_change: eigencam (-0.1000; higher is better)",
        "best deletion_auc: layercam (0.0500; lower is better)",
        "best insertion_auc: layercam (0.9000; higher is better)",
    ]
    figure = compare.panel(pictures, results, names)
    assert figure.size == compare.panel_size(2, 3, 3)


def test_a_panel_without_scores_has_one_caption_line(pictures) -> None:
    results = compare.run(fake_explain, pictures, ["layercam"], scores=[])
    figure = compare.panel(pictures, results, [])
    assert figure.size == (8 + 2 * 168, 8 + 2 * (160 + 14 + 8))
