"""docker-compose.yml: parsed by the real docker-compose, then checked for what operations need.

Debian's docker-compose (1.29, the Python one) validates the file against the Compose
Specification without a Docker engine, including profiles and GPU reservations (1.28+), so a
typo in a key fails here rather than on the GPU host. The structural checks run on the config
that docker-compose resolved (anchors merged, variables substituted with their defaults).
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

PROFILES = [None, "loadtest", "monitoring", "scale"]
SERVER_GRACE_S = 20.0


def _compose_env() -> dict[str, str]:
    """The environment without a developer's COMPOSE_*/DOCKER_*/CAMSERVE_* overrides."""
    prefixes = ("COMPOSE_", "DOCKER_", "CAMSERVE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _compose(compose_bin: str, repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose_bin, "--project-directory", str(repo_root), "-f", "docker-compose.yml", *args],
        cwd=repo_root,
        env=_compose_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _mib(size: str | int) -> float:
    """Compose/Docker byte sizes (1073741824, "1gb", "512m", "1g") in MiB; units are binary."""
    if isinstance(size, int):
        return size / 2**20
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", size.strip().lower())
    assert match, f"not a size: {size!r}"
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]
    return float(match.group(1)) * scale / 2**20


def _shm_ring_mb(repo_root: Path) -> int:
    """shm_ring_mb of deploy/camserve.toml (the config compose mounts), else the default 64."""
    config = tomllib.loads((repo_root / "deploy" / "camserve.toml").read_text())
    return int(config.get("server", {}).get("shm_ring_mb", 64))


def _profile_args(profile: str | None) -> list[str]:
    return [] if profile is None else ["--profile", profile]


def _seconds(duration: str | int | float) -> float:
    """Compose durations ("25s", "2m", "1m30s") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def resolved(compose_bin: str, repo_root: Path) -> dict[str, Any]:
    """Every service, as docker-compose resolves the file with all profiles enabled."""
    args = [a for p in PROFILES for a in _profile_args(p)]
    result = _compose(compose_bin, repo_root, *args, "config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p or "default")
def test_compose_config_is_valid(compose_bin: str, repo_root: Path, profile: str | None) -> None:
    """`docker-compose config -q` accepts the file for the default set and every profile,
    without warnings (an unset variable without a default would warn)."""
    result = _compose(compose_bin, repo_root, *_profile_args(profile), "config", "-q")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    assert "WARN" not in result.stderr.upper(), result.stderr


def test_server_reserves_a_gpu_and_drains_before_being_killed(resolved: dict[str, Any]) -> None:
    """The GPU reservation, ports, volumes, restart policy, health check and stop timeout that
    make `docker compose up` a production-shaped single-host deployment."""
    server = resolved["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    published = {(p["published"], p["target"]) for p in server["ports"]}
    assert {(50051, 50051), (9090, 9090)} <= published
    targets = {v.split(":")[1]: v for v in server["volumes"]}
    assert targets["/etc/camserve/camserve.toml"].endswith(":ro")
    assert targets["/models"].endswith(":ro")
    assert server["environment"]["CAMSERVE_CONFIG"] == "/etc/camserve/camserve.toml"
    assert server["environment"]["CAMSERVE_HOST"] == "0.0.0.0"
    assert server["restart"] == "unless-stopped"
    assert server["healthcheck"]["test"][:3] == ["CMD", "camserve", "health"]
    assert "127.0.0.1:50051" in server["healthcheck"]["test"]
    grace = float(server["environment"]["CAMSERVE_GRACE_PERIOD_S"])
    assert grace == SERVER_GRACE_S
    # Docker sends SIGKILL after stop_grace_period: it must outlast the server's own drain.
    assert _seconds(server["stop_grace_period"]) >= grace + 5


def test_servers_run_frontends_with_enough_shared_memory(
    resolved: dict[str, Any], repo_root: Path
) -> None:
    """Every server container sets its frontend count (CAMSERVE_FRONTENDS) and a /dev/shm that
    holds each frontend's two rings (Docker's default 64 MiB does not), and the loadtest opens one
    connection per frontend, since a connection stays on the frontend that accepted it."""
    services = resolved["services"]
    servers = {n: s for n, s in services.items() if s.get("image", "").startswith("camserve:")}
    servers.pop("loadtest")
    assert {"server", "server-2"} <= set(servers)
    ring_mb = _shm_ring_mb(repo_root)
    frontends: set[int] = set()
    for name, service in servers.items():
        assert "CAMSERVE_FRONTENDS" in service["environment"], f"{name}: frontends not set"
        count = int(service["environment"]["CAMSERVE_FRONTENDS"])
        assert count >= 1, f"{name}: CAMSERVE_FRONTENDS={count}, not the multi-process layout"
        frontends.add(count)
        assert "shm_size" in service, f"{name}: no shm_size, so /dev/shm is Docker's 64 MiB"
        shm = _mib(service["shm_size"])
        assert shm >= 256, f"{name}: shm_size {service['shm_size']} is under 256 MiB"
        assert shm >= 2 * ring_mb * count * 1.25, (
            f"{name}: shm_size {service['shm_size']} does not hold 2 x {ring_mb} MiB x {count} "
            "frontends plus headroom"
        )
    command = services["loadtest"]["command"]
    assert "--connections" in command
    assert {int(command[command.index("--connections") + 1])} == frontends


def test_images_are_pinned(resolved: dict[str, Any]) -> None:
    """Every image has an explicit version tag: no implicit or explicit `latest`."""
    for name, service in resolved["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: image {image!r} has no tag"
        assert "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} uses latest"


def test_profiles_add_loadtest_monitoring_and_scale_out(
    resolved: dict[str, Any], repo_root: Path
) -> None:
    """Each optional service is behind its profile and wired to the servers it depends on."""
    services = resolved["services"]
    assert "profiles" not in services["server"], "the server must start without a profile"

    loadtest = services["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    assert loadtest["entrypoint"] == ["camserve-loadtest"]
    target = loadtest["command"][loadtest["command"].index("--server") + 1]
    assert target.split(":")[0] in services
    assert "--json" in loadtest["command"]

    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert any(
        v.endswith("/deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro")
        for v in prometheus["volumes"]
    )
    scrape = yaml.safe_load((repo_root / "deploy" / "prometheus.yml").read_text())
    scraped = {
        t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    replicas = {n for n, s in services.items() if s.get("image", "").startswith("camserve:")}
    replicas -= {"loadtest"}
    assert scraped == {f"{n}:9090" for n in replicas}

    nginx = services["nginx"]
    assert nginx["profiles"] == ["scale"]
    assert any(v.endswith("/deploy/nginx.conf:/etc/nginx/nginx.conf:ro") for v in nginx["volumes"])
    scale_replicas = {n for n in replicas if services[n].get("profiles") in (None, ["scale"])}
    assert len(scale_replicas) >= 2
    assert set(nginx["depends_on"]) == scale_replicas
    upstream = re.findall(r"^\s*server\s+([\w.-]+):50051\b", _nginx_conf(repo_root), re.M)
    assert sorted(upstream) == sorted(scale_replicas)
    for name in scale_replicas:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]


def _nginx_conf(repo_root: Path) -> str:
    return (repo_root / "deploy" / "nginx.conf").read_text()
