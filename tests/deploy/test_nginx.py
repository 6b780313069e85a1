"""deploy/nginx.conf as a gRPC load balancer, checked with the real nginx and real servers.

The shipped file names the compose services (server, server-2) and listens on 8080. The tests
render it for this machine: upstream servers become 127.0.0.1 ports, the listener a free
loopback port, and logs, pid and temp files go to a private prefix. Everything that decides
behaviour (HTTP/2, round robin, keepalive, retries, timeouts, body size) is used as shipped.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

UPSTREAM_SERVER = re.compile(r"^(?P<lead>\s*server\s+)[\w.-]+:50051\b", re.M)
STARTUP_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 60.0
CALLS_PER_PHASE = 40


def render_nginx_conf(
    source: str, *, prefix: Path, listen_port: int, backends: Sequence[str]
) -> str:
    """deploy/nginx.conf with only the host-specific parts replaced (see the module docstring)."""
    backend_iter = iter(backends)
    upstream_count = len(UPSTREAM_SERVER.findall(source))
    assert upstream_count == len(backends), (
        f"nginx.conf lists {upstream_count} upstream servers, the test provides {len(backends)}"
    )
    text = UPSTREAM_SERVER.sub(lambda m: m.group("lead") + next(backend_iter), source)
    replacements = [
        (r"^(\s*listen\s+)8080\b", rf"\g<1>127.0.0.1:{listen_port}"),
        (r"^error_log\s+\S+", f"error_log {prefix / 'error.log'}"),
        (r"^(\s*access_log\s+)\S+", rf"\g<1>{prefix / 'access.log'}"),
        (
            r"^http \{$",
            "http {\n"
            + "".join(
                f"    {kind}_temp_path {prefix / 'temp' / kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        ),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
        assert count == 1, f"nginx.conf no longer has a line matching {pattern!r}"
    return f"pid {prefix / 'nginx.pid'};\n" + text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_rendered(
    repo_root: Path, prefix: Path, listen_port: int, backends: Sequence[str]
) -> Path:
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    source = (repo_root / "deploy" / "nginx.conf").read_text()
    conf.write_text(
        render_nginx_conf(source, prefix=prefix, listen_port=listen_port, backends=backends)
    )
    return conf


def test_nginx_config_is_valid(nginx_bin: str, repo_root: Path, tmp_path: Path) -> None:
    """`nginx -t` accepts the shipped config (HTTP/2 listener, grpc_pass, upstream keepalive and
    retry directives) with this machine's nginx."""
    conf = write_rendered(repo_root, tmp_path, free_port(), ["127.0.0.1:50051", "127.0.0.1:50052"])
    result = subprocess.run(
        [nginx_bin, "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_config_balances_grpc_per_call(repo_root: Path) -> None:
    """The directives that make this an L7 gRPC balancer that retries a refused replica."""
    conf = (repo_root / "deploy" / "nginx.conf").read_text()
    directives = {
        line.strip().rstrip(";").split(None, 1)[0]: line.strip().rstrip(";")
        for line in conf.splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    assert directives["grpc_pass"] == "grpc_pass grpc://camserve_backends"
    assert "http2" in directives["listen"].split()
    assert re.fullmatch(r"keepalive \d+", directives["keepalive"])
    assert set(directives["grpc_next_upstream"].split()[1:]) >= {"error", "timeout"}
    assert directives["client_max_body_size"] == "client_max_body_size 64m"
    assert directives["grpc_read_timeout"] == "grpc_read_timeout 300s"


# --- scale-out: two real servers behind the real nginx ------------------------------------------


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    def explain_ok(self) -> float:
        """Explain calls this replica answered with OK, from its Prometheus endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "camserve_requests_total"
            and sample.labels.get("rpc") == "Explain"
            and sample.labels.get("code") == "OK"
        )


def _stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def server_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config serving resnet18 with seeded random weights: real loading code, quick start-up."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("camserve.server.app")
    directory = tmp_path_factory.mktemp("camserve-config")
    torch.manual_seed(0)
    weights = directory / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = directory / "camserve.toml"
    config.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        "grace_period_s = 5\n"
        "[[models]]\n"
        'name = "resnet18"\n'
        'source = "torchvision:resnet18"\n'
        f'weights = "{weights}"\n'
        'labels = "imagenet"\n'
        'device = "cpu"\n'
        "resize = 128\n"
        "crop = 112\n"
        "max_batch_size = 8\n"
        "max_delay_ms = 2\n"
    )
    return config


@pytest.fixture
def replicas(server_config: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    """Two `python -m camserve.server` processes on ephemeral loopback ports, stopped even when
    the test fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
    env["OMP_NUM_THREADS"] = "1"  # two servers share this machine's cores
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for index in range(2):
            ready, log = tmp_path / f"ready-{index}.json", tmp_path / f"server-{index}.log"
            with log.open("wb") as log_file:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "camserve.server",
                        "--config",
                        str(server_config),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--metrics-port",
                        "0",
                        "--http-port",
                        "0",
                        "--ready-file",
                        str(ready),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            started.append((process, ready, log))
        yield [_wait_ready(process, ready, log) for process, ready, log in started]
    finally:
        for process, _, _ in started:
            _stop(process, signal.SIGTERM, timeout=30)


def _wait_ready(process: subprocess.Popen[bytes], ready: Path, log: Path) -> Replica:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{_tail(log)}")
        try:
            info = json.loads(ready.read_text())
        except (OSError, json.JSONDecodeError):
            time.sleep(0.2)
            continue
        assert info["pid"] == process.pid
        return Replica(process, int(info["port"]), int(info["metrics_port"]), log)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{_tail(log)}")


@dataclass
class Balancer:
    port: int
    prefix: Path

    @property
    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")


@pytest.fixture
def balancer(
    nginx_bin: str, repo_root: Path, replicas: list[Replica], tmp_path: Path
) -> Iterator[Balancer]:
    """nginx in the foreground with the shipped config, in front of both replicas."""
    prefix = tmp_path / "nginx"
    port = free_port()
    backends = [f"127.0.0.1:{r.port}" for r in replicas]
    conf = write_rendered(repo_root, prefix, port, backends)
    process = subprocess.Popen(
        [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"nginx exited with {process.returncode}:\n{_tail(prefix / 'error.log')}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx does not listen on {port}")
                time.sleep(0.1)
        yield Balancer(port, prefix)
    finally:
        _stop(process, signal.SIGTERM, timeout=15)


def _jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command (`camserve health --server 127.0.0.1:50051`), aimed at a
    replica's port: its exit status is what Docker and compose act on."""
    command = "import sys; from camserve.client.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", command, "health", "--server", f"127.0.0.1:{port}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode


@pytest.mark.timeout(300)
def test_nginx_spreads_calls_and_survives_a_stopped_replica(
    replicas: list[Replica], balancer: Balancer
) -> None:
    """One client channel through nginx reaches both replicas (nginx balances each call, not
    each connection). After one replica is stopped with SIGTERM and has exited (exit status 0,
    its health check failing), every further call still succeeds with no client-side retry: the
    refused connection sends the call on to the other replica (grpc_next_upstream error), and
    nginx's error log shows that this path was taken."""
    from camserve.v1 import explain_pb2, explain_pb2_grpc

    request = explain_pb2.ExplainRequest(
        model="resnet18", images=[explain_pb2.Image(encoded=_jpeg())]
    )
    with grpc.insecure_channel(f"127.0.0.1:{balancer.port}") as channel:
        stub = explain_pb2_grpc.ExplainServiceStub(channel)

        def call_all(phase: str) -> None:
            for index in range(CALLS_PER_PHASE):
                try:
                    response = stub.Explain(request, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    pytest.fail(f"{phase}: call {index} failed: {exc.code()} {exc.details()}")
                assert len(response.results) == 1
                assert response.results[0].predictions

        call_all("both replicas up")
        served = [r.explain_ok() for r in replicas]
        assert sum(served) == CALLS_PER_PHASE
        assert all(count > 0 for count in served), f"calls per replica: {served}"

        stopped, survivor = replicas
        assert _healthcheck(stopped.port) == 0
        stopped.process.send_signal(signal.SIGTERM)
        assert stopped.process.wait(timeout=30) == 0, _tail(stopped.log)
        assert _healthcheck(stopped.port) != 0

        before = survivor.explain_ok()
        call_all("one replica stopped")
        assert survivor.explain_ok() - before == CALLS_PER_PHASE
    assert re.search(
        rf"connect\(\) failed .*Connection refused.*127\.0\.0\.1:{stopped.port}",
        balancer.error_log,
    ), "nginx never tried the stopped replica, so the retry path was not exercised"
