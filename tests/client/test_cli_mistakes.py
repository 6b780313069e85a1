"""A user's mistakes on the command line: one line on stderr and a non-zero exit, never a
traceback. `camserve` and `camserve-loadtest` against a real server hosting the tiny network,
and against an address where nothing listens."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from camserve.client import cli, loadtest
from tests._support.servers import CAT_JPEG, ServerThread
from tests._support.traffic import tiny_model

pytestmark = pytest.mark.timeout(120)
NOWHERE = "127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(scope="module")
def server(test_settings) -> Iterator[ServerThread]:
    server = ServerThread(test_settings(models=(tiny_model("tiny"),), metrics_port=-1))
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def one_line(capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """The command's stderr, checked to be a single line and no traceback."""

    def read() -> str:
        err = capsys.readouterr().err.strip()
        assert err
        assert "Traceback" not in err
        assert "\n" not in err, err
        return err

    return read


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "junk.jpg").write_text("not a jpeg")
    return {"not_image": not_image, "file": a_file, "junk_folder": folder, "tmp": tmp_path}


@pytest.mark.parametrize("out", ["panels", "panels/", "existing"])
def test_compare_out_naming_a_folder_writes_compare_png_in_it(server, tmp_path, out, capsys):
    (tmp_path / "existing").mkdir()
    target = tmp_path / out
    argv = ["compare", str(CAT_JPEG), "--methods", "gradcam", "--score", "confidence"]
    code = cli.main([*argv, "--model", "tiny", "--out", f"{target}", "--server", server.address])
    assert code == 0
    written = target / "compare.png"
    assert f"panel written to {written}" in capsys.readouterr().out
    with Image.open(written) as panel:
        assert panel.format == "PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", str(CAT_JPEG), "--out", "{tmp}/table.txt"], "give a file ending in .png"),
        (["compare", str(CAT_JPEG), "--out", "{file}/panel.png"], "is a file, so nothing can"),
        (["explain", str(CAT_JPEG), "--out", "{file}"], "explain writes one PNG per heatmap"),
        (["explain", "{tmp}/gone.jpg"], "no such image file"),
        (["compare", "{not_image}"], "cannot read image: cannot identify image file"),
        (["models", "--tls-ca", "{not_image}"], "--tls-ca"),
        (["models", "--tls-ca", "{tmp}/gone.pem"], "No such file or directory"),
        (["models", "--token-file", "{tmp}/gone"], "No such file or directory"),
    ],
)
def test_bad_paths_are_usage_errors_before_any_call(argv, message, files, one_line) -> None:
    names = {key: str(path) for key, path in files.items()}
    argv = [arg.format(**names) for arg in argv]
    assert cli.main([*argv, "--server", NOWHERE]) == 2  # refused before dialling anyone
    assert message in one_line()


@pytest.mark.parametrize(
    "command", [["models"], ["health"], ["explain", str(CAT_JPEG)], ["compare", str(CAT_JPEG)]]
)
def test_an_address_where_nothing_listens_says_what_to_check(command, tmp_path, one_line):
    extra = ["--out", str(tmp_path)] if command[0] in ("explain", "compare") else []
    started = time.monotonic()
    assert cli.main([*command, *extra, "--server", NOWHERE, "--timeout", "2"]) == 1
    assert time.monotonic() - started < 15  # one call's timeout, not one per method
    err = one_line()
    assert "UNAVAILABLE" in err
    assert f"is a camserve server running at {NOWHERE}?" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "{not_image}"], "INVALID_ARGUMENT: images[0].encoded: not a decodable image"),
        (["explain", str(CAT_JPEG), "--model", "nope"], "NOT_FOUND: model: 'nope' is not hosted"),
        (["explain", str(CAT_JPEG), "--layer", "nope"], "INVALID_ARGUMENT: layer: 'nope' is not"),
        (["compare", str(CAT_JPEG), "--model", "nope"], "NOT_FOUND: model: 'nope' is not hosted"),
    ],
)
def test_server_refusals_are_one_line_and_exit_1(server, argv, message, files, one_line) -> None:
    names = {key: str(path) for key, path in files.items()}
    argv = [arg.format(**names) for arg in argv]
    extra = ["--out", str(files["tmp"] / "out")]
    code = cli.main([*argv, *extra, "--server", server.address])
    assert code == 1
    assert message in one_line()


def test_loadtest_refuses_to_start_where_nothing_listens(one_line) -> None:
    assert loadtest.main(["--server", NOWHERE, "--requests", "2", "--timeout", "2"]) == 1
    assert one_line().startswith(f"camserve-loadtest: error: cannot start against {NOWHERE}")


def test_loadtest_refuses_to_start_for_an_unknown_model(server, one_line) -> None:
    argv = ["--server", server.address, "--model", "nope", "--requests", "2", "--quiet"]
    assert loadtest.main(argv) == 1
    assert "NOT_FOUND: model: 'nope' is not hosted here" in one_line()


def test_loadtest_exits_1_when_no_request_succeeded(server, files, capsys) -> None:
    argv = ["--server", server.address, "--images", str(files["junk_folder"])]
    assert loadtest.main([*argv, "--requests", "3", "--quiet", "--model", "tiny"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("requests   3 in ")  # the report still comes first
    assert captured.err.strip() == (
        "camserve-loadtest: error: no request succeeded (INVALID_ARGUMENT 3)"
    )


@pytest.mark.parametrize("images", ["{file}", "{tmp}/gone"])
def test_loadtest_image_folders_that_cannot_be_read_are_usage_errors(images, files, one_line):
    names = {key: str(path) for key, path in files.items()}
    argv = ["--server", NOWHERE, "--images", images.format(**names), "--requests", "1"]
    assert loadtest.main(argv) == 2
    assert one_line().startswith("camserve-loadtest: error: ")
