"""The ceiling benchmark runs end to end and reports what README's table is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
SHORT = ("--duration", "1", "--warmup", "0.5", "--concurrency", "4", "--json")


def run_ceiling(*args: str) -> dict[str, Any]:
    """`serving.py --ceiling` with short runs; its JSON document."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--ceiling", *args, *SHORT],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_ceiling_json_reports_each_case_with_its_server_cpu() -> None:
    rows = run_ceiling("--inputs", "cat", "float32", "--outputs", "uint8")["ceiling"]
    assert [(r["input"], r["output"], r["transport"]) for r in rows] == [
        ("cat", "uint8", "unary"),
        ("cat", "uint8", "stream"),
        ("cat", "uint8", "http"),
        ("float32", "uint8", "unary"),
        ("float32", "uint8", "stream"),
        ("float32", "uint8", "http"),
    ]
    for row in rows:
        assert row["ips"] > 0
        assert row["server_cpu_ms_per_image"] > 0
        stages = row["stages_ms_per_image"]
        assert {"decode", "compute", "shape", "respond", "other"} <= set(stages)
    assert "preprocess" in rows[0]["stages_ms_per_image"]  # a JPEG is resized; a tensor is not


def test_ceiling_with_frontends_reports_the_engine_process_apart() -> None:
    """--frontends 1: every process of the server summed, and the engine process alone (a part
    of that sum), with 4 images per request counted as 4 images."""
    document = run_ceiling(
        *("--inputs", "uint8", "--outputs", "uint8", "--transports", "unary"),
        *("--frontends", "1", "--images-per-request", "4"),
    )
    assert (document["frontends"], document["images_per_request"]) == (1, 4)
    (row,) = document["ceiling"]
    assert row["frontends"] == 1
    assert row["images"] % 4 == 0
    assert 0 < row["engine_cpu_ms_per_image"] < row["server_cpu_ms_per_image"]
    assert 0 < row["frontends_cpu_ms_per_image"] < row["server_cpu_ms_per_image"]
