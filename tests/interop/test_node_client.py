"""A client in another language: Node.js with @grpc/grpc-js and @grpc/proto-loader, built from
protos/camserve/v1/explain.proto alone, against a real server.

The Node script (tests/node/client.mjs) asserts every check itself: health, ListModels, GetModel
(and NOT_FOUND), Explain of two photos with top-2 classes and two methods at float16 and the
original size (each heatmap's shape and dtype against its photo, values decoding to [0, 1]), and
ExplainStream with a bad item between two good ones. Its packages come from npm
(`make node-deps`, run by `make test`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from tests._support.servers import CAT_JPEG, COFFEE_JPEG
from tests._support.tools import find_tool, require

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
PROTO = ROOT / "protos" / "camserve" / "v1" / "explain.proto"
CATS = {"Egyptian cat", "tabby", "tiger cat"}


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) of a photo as a viewer shows it (EXIF orientation applied)."""
    with Image.open(path) as image:
        width, height = ImageOps.exif_transpose(image).size
    return height, width


def test_a_node_client_reads_every_answer_whole(camserve_server: Any, tmp_path: Path) -> None:
    node = find_tool("node", "nodejs")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        require("the Node client's packages are not installed: run `make node-deps`")
    images = []
    for path in (CAT_JPEG, COFFEE_JPEG):
        height, width = upright_size(path)
        images.append({"path": str(path), "height": height, "width": width})
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "address": camserve_server.address,
                "proto": str(PROTO),
                "model": "efficientnet-lite0",
                "images": images,
            }
        )
    )
    done = subprocess.run(
        [node, str(NODE_DIR / "client.mjs"), str(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"Node client failed:\n{done.stderr}\n{done.stdout}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["health"] == "SERVING"
    cat, coffee = summary["explained"]
    assert cat["top"]["label"] in CATS
    assert coffee["top"]["label"] == "espresso"
    for explained, image in zip(summary["explained"], images, strict=True):
        assert len(explained["heatmaps"]) == 4
        for heatmap in explained["heatmaps"]:
            assert heatmap["shape"] == [image["height"], image["width"]]
            assert 0 <= heatmap["low"] < heatmap["high"] <= 1
    assert summary["stream_error"]["code"] == 3  # INVALID_ARGUMENT
    assert "image" in summary["stream_error"]["message"]
