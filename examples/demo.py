"""End-to-end demo: start camserve with its built-in model, explain photos, stop the server.

Runs `camserve-server` as a real process on a free local port, waits until it reports SERVING,
explains each image with the `camserve explain` command (printing the top predictions and writing
an overlay PNG per image), then stops the server with SIGTERM as an operator would.

    python examples/demo.py --out out examples/chelsea.jpg examples/coffee.jpg
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from camserve.client import cli

START_TIMEOUT_S = 180


def start_server(ready_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Starts the server on a free port; returns the process and its port once it serves."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camserve.server",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--ready-file",
            str(ready_file),
        ],
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"camserve-server exited with code {process.returncode}")
        if ready_file.exists() and ready_file.stat().st_size:
            return process, int(json.loads(ready_file.read_text())["port"])
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"camserve-server did not become ready within {START_TIMEOUT_S} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="photos to explain")
    parser.add_argument("--out", default="out", help="folder for the overlay PNGs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        process, port = start_server(Path(scratch) / "ready.json")
        try:
            code = cli.main(
                ["explain", *args.images, "--server", f"127.0.0.1:{port}", "--out", args.out]
            )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    if code == 0:
        print(f"overlays written to {args.out}/")
    return code or process.returncode


if __name__ == "__main__":
    raise SystemExit(main())
