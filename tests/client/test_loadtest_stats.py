"""Load-test statistics and inputs, without a server."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from camserve.client.loadtest import (
    LoadConfig,
    LoadStats,
    format_report,
    percentile,
    synthetic_images,
)


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 50) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_report_has_exactly_the_documented_keys_and_consistent_numbers() -> None:
    stats = LoadStats()
    for i in range(1, 11):
        stats.success(i / 1000, batch_size=2 if i % 2 else 4)
    stats.failure("RESOURCE_EXHAUSTED")
    stats.failure("RESOURCE_EXHAUSTED")
    stats.failure("DEADLINE_EXCEEDED")
    report = stats.report(duration_s=2.0, connections=4)
    assert set(report) == {
        "requests",
        "errors",
        "duration_s",
        "throughput_rps",
        "latency_ms",
        "mean_batch",
        "connections",
    }
    assert report["requests"] == 13
    assert report["errors"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert report["throughput_rps"] == 5.0  # successes per second
    assert report["latency_ms"] == {"p50": 5.0, "p90": 9.0, "p99": 10.0, "max": 10.0}
    assert report["mean_batch"] == 3.0
    assert report["connections"] == 4
    assert "RESOURCE_EXHAUSTED 2" in format_report(report)
    assert "connections 4" in format_report(report).splitlines()


def test_report_without_successes_has_no_latencies() -> None:
    stats = LoadStats()
    stats.failure("UNAVAILABLE")
    report = stats.report(duration_s=1.0)
    assert report["requests"] == 1
    assert report["latency_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert report["mean_batch"] is None
    assert "UNAVAILABLE 1" in format_report(report)


def test_synthetic_images_are_seeded_jpegs() -> None:
    images = synthetic_images(3, seed=1)
    assert len(images) == 3
    assert images == synthetic_images(3, seed=1)
    assert images != synthetic_images(3, seed=2)
    with Image.open(io.BytesIO(images[0])) as picture:
        assert (picture.format, picture.size, picture.mode) == ("JPEG", (224, 224), "RGB")


@pytest.mark.parametrize(
    "changes",
    [
        {"concurrency": None},
        {"rate": 5.0},
        {"requests": 10},
        {"duration_s": 3601.0},
        {"concurrency": 5000},
        {"max_in_flight": 0},
        {"connections": 0},
        {"connections": 65},
        {"images": ()},
    ],
)
def test_load_configs_are_bounded(changes) -> None:
    settings = {"server": "h:1", "images": (b"x",), **changes}
    with pytest.raises(ValueError, match="exactly one|within|no images"):
        LoadConfig(**settings)
