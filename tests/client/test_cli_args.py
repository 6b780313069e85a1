"""Command-line parsing of `camserve` and `camserve-loadtest`, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from camserve.client import cli, loadtest
from camserve.client.requests import METHODS


def test_explain_options_parse() -> None:
    args = cli.build_parser().parse_args(
        [
            "explain",
            "a.jpg",
            "b.png",
            "--target",
            "285",
            "--target",
            "tabby",
            "--method",
            "gradcam",
            "--method",
            "layercam",
            "--layer",
            "layer4",
            "--model",
            "resnet18",
            "--panel",
            "--out",
            "figs",
            "--server",
            "host:1",
            "--timeout",
            "2.5",
        ]
    )
    assert args.images == [Path("a.jpg"), Path("b.png")]
    assert args.target == [285, "tabby"]
    assert args.method == ["gradcam", "layercam"]
    assert (args.layer, args.model, args.panel) == ("layer4", "resnet18", True)
    assert args.out == Path("figs")
    assert (args.server, args.timeout) == ("host:1", 2.5)


def test_defaults() -> None:
    args = cli.build_parser().parse_args(["explain", "a.jpg"])
    assert args.server == "127.0.0.1:50051"
    assert args.out == Path("out")
    assert args.target == []
    assert args.method == []
    assert args.timeout is None
    assert not args.panel


def test_explain_takes_every_method_smoothing_and_scores() -> None:
    argv = ["explain", "a.jpg", "--eigen-smooth", "--aug-smooth", "--score-steps", "8"]
    for method in METHODS:
        argv += ["--method", method]
    args = cli.build_parser().parse_args([*argv, "--score", "deletion", "--score", "confidence"])
    assert args.method == list(METHODS)
    assert (args.eigen_smooth, args.aug_smooth) == (True, True)
    assert args.score == ["deletion", "confidence"]
    assert args.score_steps == 8
    defaults = cli.build_parser().parse_args(["explain", "a.jpg"])
    assert (defaults.score, defaults.score_steps, defaults.aug_smooth) == ([], None, False)


def test_compare_defaults_to_every_method_and_score() -> None:
    args = cli.build_parser().parse_args(["compare", "a.jpg", "b.jpg"])
    assert args.images == [Path("a.jpg"), Path("b.jpg")]
    assert args.methods == list(METHODS)
    assert len(args.methods) == 16
    assert args.score == []  # all three when none is named
    assert args.out == Path("compare.png")
    assert (args.model, args.layer, args.score_steps) == (None, None, None)


def test_compare_options_parse() -> None:
    args = cli.build_parser().parse_args(
        [
            "compare",
            "a.jpg",
            "--methods",
            "scorecam, gradcam,scorecam",
            "--score",
            "insertion",
            "--score-steps",
            "5",
            "--out",
            "figs/p.png",
            "--model",
            "tiny",
            "--layer",
            "features",
        ]
    )
    assert args.methods == ["scorecam", "gradcam"]
    assert args.score == ["insertion"]
    assert args.score_steps == 5
    assert (args.out, args.model, args.layer) == (Path("figs/p.png"), "tiny", "features")


def test_the_server_comes_from_the_environment_unless_given(monkeypatch) -> None:
    monkeypatch.setenv("CAMSERVE_SERVER", "envhost:7")
    captured = {}

    def fake_run(client, args):
        captured["server"] = args.server
        return 0

    monkeypatch.setattr(cli, "_models", fake_run)
    assert cli.main(["models"]) == 0
    assert captured["server"] == "envhost:7"
    assert cli.main(["models", "--server", "flag:8"]) == 0
    assert captured["server"] == "flag:8"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["explain"],
        ["explain", "a.jpg", "--method", "gradcam++"],
        ["explain", "a.jpg", "--top-k", "0"],
        ["explain", "a.jpg", "--top-k", "2", "--target", "1"],
        ["health", "--timeout", "-1"],
        ["fly"],
        ["explain", "a.jpg", "--score", "roads"],
        ["explain", "a.jpg", "--score-steps", "5"],
        ["explain", "a.jpg", "--score", "confidence", "--score-steps", "5"],
        ["explain", "a.jpg", "--score", "deletion", "--score-steps", "0"],
        ["compare"],
        ["compare", "a.jpg", "--methods", "gradcam,gradcam++"],
        ["compare", "a.jpg", "--methods", ","],
        ["compare", "a.jpg", "--score", "confidence", "--score-steps", "5"],
    ],
)
def test_usage_errors_exit_2(argv, capsys) -> None:
    assert cli.main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_usage_errors_say_what_to_change(capsys) -> None:
    assert cli.main(["compare", "a.jpg", "--methods", "gradcam,grad"]) == 2
    assert "unknown methods ['grad']; use a comma-separated list of gradcam," in (
        capsys.readouterr().err
    )
    assert cli.main(["explain", "a.jpg", "--score-steps", "5"]) == 2
    assert "--score-steps is for the curves: add --score deletion" in capsys.readouterr().err


def test_help_exits_0(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out


def test_a_missing_token_file_is_a_usage_error(tmp_path, capsys) -> None:
    assert cli.main(["models", "--token-file", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["explain", "compare"])
def test_missing_images_are_a_usage_error(command, tmp_path, capsys) -> None:
    assert cli.main([command, str(tmp_path / "gone.jpg"), "--server", "127.0.0.1:1"]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_loadtest_options_parse() -> None:
    args = loadtest.build_parser().parse_args(
        ["--server", "h:1", "--rate", "50", "--requests", "100", "--json", "--fixed-interval"]
    )
    assert (args.rate, args.requests, args.json, args.fixed_interval) == (50.0, 100, True, True)
    assert args.connections == 1
    assert (
        loadtest.build_parser().parse_args(["--server", "h:1", "--connections", "4"]).connections
        == 4
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --server is required: the load test never picks a target by itself
        ["--server", "h:1", "--concurrency", "2", "--rate", "3"],
        ["--server", "h:1", "--duration", "2", "--requests", "3"],
        ["--server", "h:1", "--duration", "4000"],
        ["--server", "h:1", "--concurrency", "0"],
        ["--server", "h:1", "--requests", "0"],
        ["--server", "h:1", "--rate", "0"],
        ["--server", "h:1", "--connections", "0"],
        ["--server", "h:1", "--connections", "two"],
    ],
)
def test_loadtest_usage_errors_exit_2(argv, capsys) -> None:
    assert loadtest.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_loadtest_reads_image_folders(tmp_path) -> None:
    (tmp_path / "a.JPG").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    (tmp_path / "notes.txt").write_bytes(b"c")
    assert loadtest.folder_images(tmp_path) == (b"a", b"b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        loadtest.folder_images(empty)
