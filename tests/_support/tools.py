"""System tools some suites drive (nginx, docker-compose, Node.js): found, or skipped with the fix.

`make test` installs them through .ci/system-deps. Without one a test skips and says why, except
under CI=true: there a missing tool fails the run, so those checks cannot silently disappear from
CI.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(reason: str) -> None:
    """Skips the test for `reason` (what is missing and how to get it); fails under CI=true."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: these tests must run)")
    pytest.skip(reason)


def find_tool(name: str, package: str, *fallbacks: str) -> str:
    """The tool's path; otherwise a skip (locally) or a failure (CI=true) naming the fix."""
    path = shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)
    if path:
        return path
    require(f"{name} is not installed: run `make system-deps` or `apt-get install {package}`")
    raise AssertionError("unreachable")  # require() always raises
