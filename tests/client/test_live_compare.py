"""`camserve explain --score` and `camserve compare` against a real server hosting two copies of
the tiny ten-class network: `tiny` with room for any request, and `tight`, whose queue of 20
forward passes holds a scored Grad-CAM request (1 explain row + 1 masked row + 2 x 4 curve rows
+ 1 baseline row = 11 at 5 steps), and whose `features.1` is declared channels-last, so
AblationCAM (NCHW layers only) is refused there with INVALID_ARGUMENT while ScoreCAM's 8 rows
there are served."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from camserve.client import cli, compare
from camserve.client.requests import METHODS
from tests._support.servers import CAT_JPEG, COFFEE_JPEG, ServerThread
from tests._support.traffic import tiny_model

SCORES = ("confidence_change", "deletion_auc", "insertion_auc")
NUMBER = r"-?\d+\.\d{4}"


@pytest.fixture(scope="module")
def server(test_settings) -> Iterator[ServerThread]:
    from camserve.server.settings import LimitsSettings

    settings = test_settings(
        models=(
            tiny_model("tiny"),
            tiny_model("tight", max_queue=20, layer_layouts=(("features.1", "nhwc"),)),
        ),
        metrics_port=-1,
        limits=LimitsSettings(max_images_per_request=4),
    )
    server = ServerThread(settings)
    yield server
    server.stop(grace=1.0)


def run(server: ServerThread, *argv: str) -> int:
    return cli.main([*argv, "--server", server.address])


def table_rows(out: str) -> dict[str, str]:
    """The table's rows by method (the first word of each line naming one)."""
    return {line.split()[0]: line for line in out.splitlines() if line.split()[:1][0] in METHODS}


def test_explain_prints_the_scores_of_each_heatmap(server, tmp_path, capsys) -> None:
    code = run(
        server,
        "explain",
        str(CAT_JPEG),
        "--model",
        "tiny",
        "--method",
        "gradcam",
        "--method",
        "scorecam",
        "--score",
        "confidence",
        "--score",
        "deletion",
        "--score-steps",
        "4",
        "--out",
        str(tmp_path),
    )
    out = capsys.readouterr().out
    assert code == 0
    scored = re.findall(
        rf"^chelsea\.jpg: (\w+) (\d+) class_\d+: confidence_change ({NUMBER}) "
        rf"deletion_auc ({NUMBER})$",
        out,
        re.MULTILINE,
    )
    assert [method for method, *_ in scored] == ["gradcam", "scorecam"]
    for _, _, change, deletion in scored:
        assert float(change) > -1
        assert 0 <= float(deletion) <= 1
    assert len(list(tmp_path.glob("chelsea_*.png"))) == 2


def test_compare_runs_every_method_and_writes_the_panel(server, tmp_path, capsys) -> None:
    out_file = tmp_path / "figs" / "panel.png"
    code = run(
        server,
        "compare",
        str(CAT_JPEG),
        str(COFFEE_JPEG),
        "--model",
        "tiny",
        "--out",
        str(out_file),
    )
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["method", *SCORES, "s/image"]
    rows = table_rows(out)
    assert list(rows) == list(METHODS)
    for method, row in rows.items():
        assert re.fullmatch(rf"{method}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\d+\.\d{{3}}", row)
    for score in SCORES:
        best = re.search(
            rf"^best {score}: (\w+) \(({NUMBER}); (higher|lower) is better\)$", out, re.M
        )
        assert best, score
        method, value, direction = best.groups()
        column = [float(rows[m].split()[1 + SCORES.index(score)]) for m in METHODS]
        expected = min(column) if score == "deletion_auc" else max(column)
        assert float(value) == pytest.approx(expected, abs=1e-4)
        assert direction == ("lower" if score == "deletion_auc" else "higher")
    assert f"panel written to {out_file}" in out
    with Image.open(out_file) as panel:
        assert panel.format == "PNG"
        methods = len(METHODS)  # every method, the pixel attributions too
        assert panel.size == compare.panel_size(images=2, methods=methods, scores=3) == (2864, 456)
        pixels = np.asarray(panel.convert("RGB"))
    cell = compare.CELL
    for column in range(1 + methods):  # the image and an overlay per method: all drawn
        left = compare.MARGIN + column * (cell + compare.MARGIN)
        box = pixels[compare.MARGIN : compare.MARGIN + cell, left : left + cell]
        assert (box < 250).any(), column


def test_a_refused_method_is_reported_with_the_servers_message(server, tmp_path, capsys):
    out_file = tmp_path / "tight.png"
    code = run(
        server,
        "compare",
        str(CAT_JPEG),
        "--model",
        "tight",
        "--layer",
        "features.1",
        "--methods",
        "gradcam,ablationcam,scorecam",
        "--score-steps",
        "5",
        "--out",
        str(out_file),
    )
    captured = capsys.readouterr()
    assert code == 0  # some methods succeeded
    rows = table_rows(captured.out)
    assert list(rows) == ["gradcam", "ablationcam", "scorecam"]
    assert rows["ablationcam"].split()[1:3] == ["refused:", "INVALID_ARGUMENT:"]
    assert "tight" in rows["ablationcam"]  # the server's message names the model
    for method in ("gradcam", "scorecam"):
        assert re.fullmatch(rf"{method}(\s+{NUMBER}){{3}}\s+\d+\.\d{{3}}", rows[method])
    best = [line for line in captured.out.splitlines() if line.startswith("best")]
    assert len(best) == 3
    assert not any("ablationcam" in line for line in best)
    with Image.open(out_file) as panel:
        assert panel.size == compare.panel_size(images=1, methods=3, scores=3)
        pixels = np.asarray(panel.convert("RGB"))
    left = compare.MARGIN + 2 * (compare.CELL + compare.MARGIN)  # AblationCAM's cell: grey
    box = pixels[compare.MARGIN : compare.MARGIN + compare.CELL, left : left + compare.CELL]
    assert (box == 211).all()  # PIL's "lightgrey"


@pytest.mark.parametrize(
    ("argv", "code_name"),
    [
        (["--model", "tight", "--layer", "features.1", "--methods", "ablationcam"], "INVALID_"),
        (["--model", "tiny", "--methods", "gradcam,eigencam", "--layer", "no.such"], "INVALID_"),
    ],
)
def test_exit_1_only_when_every_method_failed(server, tmp_path, capsys, argv, code_name):
    code = run(server, "compare", str(CAT_JPEG), *argv, "--out", str(tmp_path / "p.png"))
    captured = capsys.readouterr()
    assert code == 1
    assert "every method failed" in captured.err
    rows = table_rows(captured.out)
    assert rows
    for row in rows.values():
        assert f"refused: {code_name}" in row
    assert not any(line.startswith("best") for line in captured.out.splitlines())
