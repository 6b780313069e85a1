"""Fixtures for the deployment tests: the repository root and the system tools they drive.

nginx and docker-compose come from Debian (`make test` installs them through .ci/system-deps).
Without them a test skips and says why, except under CI=true: there a missing tool fails the
run, so the deployment checks cannot silently disappear from CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(name: str, package: str, *fallbacks: str) -> str:
    """The tool's path; otherwise a skip (locally) or a failure (CI=true) naming the fix."""
    path = shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)
    if path:
        return path
    reason = f"{name} is not installed: run `make system-deps` or `apt-get install {package}`"
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the deployment tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks.
    return find_tool("nginx", "nginx", "/usr/sbin/nginx")


@pytest.fixture(scope="session")
def compose_bin() -> str:
    return find_tool("docker-compose", "docker-compose")
