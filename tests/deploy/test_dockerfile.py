"""A small Dockerfile lint: the properties that matter for running camserve in production.

CI has no Docker engine, so the image is never built here; these checks read the Dockerfile the
way the builder does (continuation lines joined, global ARG defaults substituted into FROM) and
check what a reviewer would: pinned bases for both variants, a non-root user, a health check,
exec-form entrypoint and a proper stop signal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VARIANTS = ("cuda", "cpu")


@dataclass
class Stage:
    base: str  # as written, e.g. "${BASE_IMAGE}" or "base-${VARIANT}"
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def resolve(self, text: str, overrides: dict[str, str]) -> str:
        values = {**self.global_args, **overrides}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)

    def final(self) -> Stage:
        return self.stages[-1]

    def all(self, keyword: str, stage: Stage | None = None) -> list[str]:
        stages = [stage] if stage else self.stages
        return [args for s in stages for kw, args in s.instructions if kw == keyword]


def parse(text: str) -> Dockerfile:
    """Instructions in order, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, f"cannot parse FROM {args}"
            stages.append(Stage(base=match.group(1), name=match.group(2) or str(len(stages))))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


@pytest.fixture(scope="module")
def dockerfile(repo_root: Path) -> Dockerfile:
    return parse((repo_root / "Dockerfile").read_text())


def _is_exec_form(args: str) -> bool:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return False
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_base_image_is_pinned(dockerfile: Dockerfile, variant: str) -> None:
    """For each variant, every FROM is an earlier stage or an image with an explicit, non-latest
    tag (or a digest), so a rebuild cannot silently pick up a different PyTorch or CUDA."""
    seen: set[str] = set()
    for stage in dockerfile.stages:
        base = dockerfile.resolve(stage.base, {"VARIANT": variant})
        if base not in seen:
            assert "@sha256:" in base or ":" in base.rsplit("/", 1)[-1], f"untagged FROM {base}"
            assert not base.endswith(":latest"), f"FROM {base} uses latest"
        seen.add(stage.name)
    final_base = dockerfile.resolve(dockerfile.final().base, {"VARIANT": variant})
    assert final_base == f"base-{variant}"


def test_variants_select_cuda_pytorch_or_cpu_wheels(dockerfile: Dockerfile) -> None:
    """The default is a CUDA PyTorch image; VARIANT=cpu installs torch from the CPU wheel index."""
    assert dockerfile.global_args["VARIANT"] == "cuda"
    assert re.fullmatch(
        r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime",
        dockerfile.global_args["BASE_IMAGE"],
    )
    assert dockerfile.global_args["CPU_BASE_IMAGE"].startswith("python:3.")
    cpu = next(s for s in dockerfile.stages if s.name == "torch-cpu")
    assert any("download.pytorch.org/whl/cpu" in a for a in dockerfile.all("ARG", cpu))
    assert any("--index-url" in a for a in dockerfile.all("RUN", cpu))


def test_multi_stage_build_installs_the_server_extra(dockerfile: Dockerfile) -> None:
    """A builder stage installs camserve[server] into a virtualenv; the runtime stage only
    copies that virtualenv, so no build tooling or source tree ends up in the image."""
    builder = next(s for s in dockerfile.stages if s.name == "builder")
    assert any("[server]" in a for a in dockerfile.all("RUN", builder))
    final = dockerfile.final()
    assert any(a.startswith("--from=builder") for a in dockerfile.all("COPY", final))
    assert not any(
        a.startswith(("client", "server", "protos")) for a in dockerfile.all("COPY", final)
    )


def test_runtime_runs_as_non_root(dockerfile: Dockerfile) -> None:
    users = dockerfile.all("USER", dockerfile.final())
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"


def test_healthcheck_asks_the_grpc_health_service(dockerfile: Dockerfile) -> None:
    checks = dockerfile.all("HEALTHCHECK", dockerfile.final())
    assert len(checks) == 1
    command = checks[0].split(" CMD ", 1)[1].strip()
    assert _is_exec_form(command)
    assert json.loads(command) == ["camserve", "health", "--server", "127.0.0.1:50051"]


def test_signals_reach_the_server(dockerfile: Dockerfile) -> None:
    """Exec-form ENTRYPOINT/CMD make the server PID 1, so SIGTERM starts its graceful drain
    instead of killing a shell wrapper."""
    final = dockerfile.final()
    assert dockerfile.all("STOPSIGNAL", final) == ["SIGTERM"]
    entrypoints = dockerfile.all("ENTRYPOINT", final)
    assert entrypoints
    assert all(_is_exec_form(e) for e in entrypoints)
    assert json.loads(entrypoints[-1])[0] == "camserve-server"
    assert all(_is_exec_form(c) for c in dockerfile.all("CMD", final))


def test_runtime_listens_on_all_interfaces_and_exposes_its_ports(dockerfile: Dockerfile) -> None:
    final = dockerfile.final()
    exposed = {p for args in dockerfile.all("EXPOSE", final) for p in args.split()}
    assert {"50051", "9090"} <= exposed
    env = " ".join(dockerfile.all("ENV", final))
    assert re.search(r"\bCAMSERVE_HOST=0\.0\.0\.0\b", env)


def _env(dockerfile: Dockerfile, stage: Stage) -> dict[str, str]:
    """The KEY=VALUE pairs of a stage's ENV instructions."""
    pairs = [p for args in dockerfile.all("ENV", stage) for p in args.split()]
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def test_gpu_image_sets_the_frontend_count(dockerfile: Dockerfile) -> None:
    """The CUDA runtime runs a fixed number of gRPC frontends (so the /dev/shm it needs is known,
    whatever the host's core count); the CPU runtime leaves CAMSERVE_FRONTENDS unset (auto: one
    process on the CPU), so Docker's default /dev/shm is enough for it."""
    stages = {s.name: s for s in dockerfile.stages}
    cuda, cpu = _env(dockerfile, stages["base-cuda"]), _env(dockerfile, stages["base-cpu"])
    assert "CAMSERVE_FRONTENDS" in cuda, "the CUDA image leaves the frontend count to auto"
    assert int(cuda["CAMSERVE_FRONTENDS"]) >= 1
    assert "CAMSERVE_FRONTENDS" not in cpu
    assert "CAMSERVE_FRONTENDS" not in _env(dockerfile, dockerfile.final()), (
        "set in the final stage, it would apply to the CPU variant too"
    )


def test_nothing_is_fetched_at_run_time(dockerfile: Dockerfile) -> None:
    """Weights come from the image (built-in model) or the /models volume, never from the
    network: no ADD of a URL, and the entrypoint is the server itself, not a fetch script."""
    for stage in dockerfile.stages:
        for args in dockerfile.all("ADD", stage):
            assert "://" not in args, f"ADD of a URL: {args}"
    final = dockerfile.final()
    assert not any(re.search(r"\b(curl|wget)\b", a) for a in dockerfile.all("RUN", final))


def test_dockerignore_keeps_the_context_small(repo_root: Path) -> None:
    patterns = {
        line.strip()
        for line in (repo_root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", "out", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert required in patterns, f".dockerignore misses {required}"
    assert {"**/*.pt", "**/*.pth", "**/*.safetensors"} <= patterns, "weights must stay out"
    for needed in ("pyproject.toml", "README.md", "client", "server", "protos"):
        assert needed not in patterns, f"{needed} is needed by the build"
