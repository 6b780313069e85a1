"""The `camserve` and `camserve-loadtest` commands against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from camserve.client import cli, loadtest
from tests._support.servers import CAT_JPEG, COFFEE_JPEG
from tests._support.traffic import tiny_model

COMMAND = [sys.executable, "-c", "from camserve.client.cli import main; raise SystemExit(main())"]


def picture_size(path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.verify()  # a complete, valid PNG
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return picture.size


def test_explain_writes_overlays_at_the_original_size(camserve_server, tmp_path, capsys) -> None:
    code = cli.main(
        [
            "explain",
            str(CAT_JPEG),
            str(COFFEE_JPEG),
            "--server",
            camserve_server.address,
            "--method",
            "gradcam",
            "--method",
            "layercam",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("chelsea.jpg: 285 Egyptian cat 0.")
    assert any(line.startswith("coffee.jpg: 967 espresso 0.") for line in out)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [
        "chelsea_gradcam_285.png",
        "chelsea_layercam_285.png",
        "coffee_gradcam_967.png",
        "coffee_layercam_967.png",
    ]
    assert picture_size(tmp_path / "chelsea_gradcam_285.png") == Image.open(CAT_JPEG).size
    assert picture_size(tmp_path / "coffee_layercam_967.png") == Image.open(COFFEE_JPEG).size


def test_explain_targets_and_panels(camserve_server, tmp_path, capsys) -> None:
    args = ["explain", str(CAT_JPEG), "--server", camserve_server.address, "--out", str(tmp_path)]
    assert cli.main([*args, "--target", "tabby", "--target", "285"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "chelsea_gradcam_281.png",
        "chelsea_gradcam_285.png",
    }
    assert cli.main([*args, "--top-k", "2", "--panel", "--model", "efficientnet-lite0"]) == 0
    width, height = picture_size(tmp_path / "chelsea_panel.png")
    assert width > height  # three panels side by side, two rows
    capsys.readouterr()


def test_server_errors_exit_1_with_the_message(camserve_server, tmp_path, capsys) -> None:
    args = ["explain", str(CAT_JPEG), "--server", camserve_server.address, "--out", str(tmp_path)]
    assert cli.main([*args, "--layer", "no.such.layer"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert cli.main([*args, "--model", "no-such-model"]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_models_lists_models_and_layers(camserve_server, capsys) -> None:
    assert cli.main(["models", "--server", camserve_server.address]) == 0
    out = capsys.readouterr().out
    assert out.startswith("efficientnet-lite0 (version")
    assert "\nresnet18 (version" in out
    assert "\n  layer4  512x7x7\n" in out


def test_the_command_runs_as_a_process(camserve_server, tmp_path) -> None:
    env = {**os.environ, "CAMSERVE_SERVER": camserve_server.address}
    done = subprocess.run(
        [*COMMAND, "explain", str(CAT_JPEG), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("chelsea.jpg: 285 Egyptian cat 0.3")
    assert picture_size(tmp_path / "chelsea_gradcam_285.png") == (451, 300)
    healthy = subprocess.run([*COMMAND, "health"], env=env, capture_output=True, timeout=60)
    assert healthy.returncode == 0
    assert healthy.stdout.decode().strip() == f"{camserve_server.address}: SERVING"


def test_health_exits_1_when_nothing_listens(capsys) -> None:
    started = time.monotonic()
    assert cli.main(["health", "--server", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("camserve: UNAVAILABLE")
    assert "\n" not in err


def test_a_closed_loop_load_test_reports_consistent_numbers(camserve_server, capsys) -> None:
    argv = ["--server", camserve_server.address, "--duration", "5", "--concurrency", "4"]
    assert loadtest.main([*argv, "--json", "--model", "resnet18"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert set(report) == {
        "requests",
        "errors",
        "duration_s",
        "throughput_rps",
        "latency_ms",
        "mean_batch",
        "connections",
    }
    assert report["connections"] == 1
    successes = report["requests"] - sum(report["errors"].values())
    assert successes > 0
    assert report["errors"] == {}
    assert 5.0 <= report["duration_s"] < 40
    assert report["throughput_rps"] == pytest.approx(successes / report["duration_s"], rel=0.01)
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert 1 <= report["mean_batch"] <= 8  # resnet18's max_batch_size
    assert "\r" in captured.err  # the progress line


def test_an_open_loop_load_test_sends_exactly_the_requests_asked(camserve_server, capsys) -> None:
    argv = ["--server", camserve_server.address, "--rate", "40", "--requests", "20"]
    assert loadtest.main([*argv, "--fixed-interval", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("requests   20 in ")
    assert "latency ms p50" in captured.out


def test_an_open_loop_load_test_stops_at_its_duration(camserve_server, capsys) -> None:
    argv = ["--server", camserve_server.address, "--rate", "20", "--duration", "1.5"]
    assert loadtest.main([*argv, "--json", "--quiet", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 5 <= report["requests"] <= 80  # Poisson arrivals at 20/s for 1.5 s
    assert 1.5 <= report["duration_s"] < 20


def test_a_load_test_spreads_its_calls_over_connections(
    server_factory, client_ports, capsys
) -> None:
    server = server_factory(models=(tiny_model("tiny"),), metrics_port=-1)
    argv = ["--server", server.address, "--model", "tiny", "--concurrency", "6"]
    argv += ["--duration", "1", "--connections", "3", "--json", "--quiet"]
    outcome: list[int] = []
    run = threading.Thread(target=lambda: outcome.append(loadtest.main(argv)))
    run.start()
    seen: set[int] = set()  # every client port that connected while the test ran
    while run.is_alive():
        seen |= client_ports(server.port)
        time.sleep(0.02)
    run.join()
    assert outcome == [0]
    report = json.loads(capsys.readouterr().out)
    assert report["connections"] == 3
    assert report["errors"] == {}
    assert report["requests"] > 0
    assert len(seen) == 3
