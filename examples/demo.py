"""End-to-end demo: start camserve with its built-in model, explain photos, open the web page.

Runs `camserve-server` as a real process on free local ports, waits until it reports SERVING,
explains each image with the `camserve explain` command (printing the top predictions and writing
an overlay PNG per image), prints the web page's URL and keeps serving it until Ctrl-C (right away
with --no-page, or when standard input is not a terminal, as in scripts and CI), then stops the
server with SIGTERM as an operator would.

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


def start_server(ready_file: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Starts the server on free ports; returns the process and its ready file once it serves."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camserve.server",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--http-port",
            "0",
            "--ready-file",
            str(ready_file),
        ],
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"camserve-server exited with code {process.returncode}")
        if ready_file.exists() and ready_file.stat().st_size:
            return process, json.loads(ready_file.read_text())
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"camserve-server did not become ready within {START_TIMEOUT_S} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="photos to explain")
    parser.add_argument("--out", default="out", help="folder for the overlay PNGs")
    parser.add_argument(
        "--no-page", action="store_true", help="stop after explaining instead of serving the page"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        process, ready = start_server(Path(scratch) / "ready.json")
        try:
            server = f"127.0.0.1:{ready['port']}"
            code = cli.main(["explain", *args.images, "--server", server, "--out", args.out])
            if code == 0:
                print(f"overlays written to {args.out}/")
            if code == 0 and not args.no_page and sys.stdin.isatty():
                serve_page(ready["http_port"])
            elif code == 0:
                print(f"web page (while a server runs): http://127.0.0.1:{ready['http_port']}/")
                print("not a terminal: stopping the server instead of serving the page")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    return code or process.returncode


def serve_page(http_port: int) -> None:
    """Prints the page's URL and waits for Ctrl-C (or SIGTERM) while the server serves it."""
    print(f"\nweb page: http://127.0.0.1:{http_port}/  (drop a photo there; Ctrl-C stops)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        signal.pause()
    except KeyboardInterrupt:
        print("stopping the server")


if __name__ == "__main__":
    raise SystemExit(main())
