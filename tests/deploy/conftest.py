"""Fixtures for the deployment tests: the repository root and the system tools they drive
(nginx and docker-compose from Debian; see `tests._support.tools`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._support.tools import find_tool

REPO_ROOT = Path(__file__).resolve().parents[2]


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
