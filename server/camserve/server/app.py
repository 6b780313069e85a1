"""Assembles and runs the server: gRPC, the HTTP API and page, health, reflection, metrics,
models, graceful shutdown.

`start_server(settings)` returns a running `CamServer` (tests bind port 0 and read `.port`);
`main()` is the `camserve-server` command: it serves until SIGTERM or SIGINT, then turns health
to NOT_SERVING, refuses new calls, finishes every accepted one within the grace period, and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.server import logs
from camserve.server.backend import ModelBackend
from camserve.server.compute import LocalBackend
from camserve.server.interceptors import (
    BearerTokenInterceptor,
    ObservabilityInterceptor,
    ParsingInterceptor,
)
from camserve.server.metrics import Metrics
from camserve.server.pipeline import ExplainPipeline
from camserve.server.registry import ModelRegistry
from camserve.server.servicer import ExplainServicer
from camserve.server.settings import (
    HTTP_DISABLED,
    METRICS_DISABLED,
    Settings,
    SettingsError,
    load_settings,
)
from camserve.server.supervisor import Supervisor, start_supervisor
from camserve.server.web.server import HttpServer
from camserve.v1 import explain_pb2, explain_pb2_grpc

log = logging.getLogger("camserve.app")
# After the last started request, a moment for calls already on the wire to be refused cleanly.
DRAIN_SETTLE_S = 0.2
SERVICE_NAME = explain_pb2.DESCRIPTOR.services_by_name["ExplainService"].full_name


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read {what} {path}: {exc.strerror}") from None


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    pair = (
        _read(settings.tls_key_file, "TLS key"),
        _read(settings.tls_cert_file, "TLS certificate"),
    )
    client_ca = (
        _read(settings.tls_client_ca_file, "client CA") if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _token(settings: Settings) -> str:
    if settings.auth_token_file:
        return _read(settings.auth_token_file, "auth token file").decode().strip()
    return settings.auth_token


def _write_atomically(path: Path, text: str) -> None:
    """Writes via a temporary file and a rename, so readers never see half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model's health."""
    return f"{SERVICE_NAME}/{model}"


def _serving(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def _grpc_server(settings: Settings, metrics: Metrics, reuse_port: bool) -> grpc.aio.Server:
    """The gRPC server with its interceptors (outermost first, so every call is counted, the
    token's refusals included) and its bounds. SO_REUSEPORT only where the supervisor asks for
    it (its own frontends share the port): gRPC would otherwise let a stale server share it."""
    interceptors: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(metrics)]
    if token := _token(settings):
        interceptors.append(BearerTokenInterceptor(token))
    interceptors.append(ParsingInterceptor())
    return grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.limits.max_concurrent_streams),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *_connection_age(settings),
        ],
    )


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    """Ends connections after `max_connection_age_s`, so long-lived clients reconnect and
    spread over the frontends again."""
    if settings.max_connection_age_s <= 0:
        return []
    age_ms = int(settings.max_connection_age_s * 1000)
    return [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", 30_000)]


class CamServer:
    """A started server: its port, its models, and how to stop it gracefully."""

    def __init__(
        self,
        settings: Settings,
        backend: ModelBackend | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._reuse_port = reuse_port
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._pool = ThreadPoolExecutor(
            max_workers=settings.pool_threads, thread_name_prefix="preprocess"
        )
        self.backend: ModelBackend = (
            backend if backend is not None else LocalBackend(settings, self.metrics, self._pool)
        )
        self.server = _grpc_server(settings, self.metrics, reuse_port)
        self.pipeline = ExplainPipeline(
            self.backend, settings, self._pool, self.metrics, device_decode=backend is None
        )
        self.servicer = ExplainServicer(
            self.pipeline, settings.limits, max_message_bytes=settings.max_message_bytes
        )
        self._add_services()
        self.port = self._bind()
        self.metrics_port: int | None = None
        self._metrics_server: WSGIServer | None = None
        self.http: HttpServer | None = None
        if settings.http_port != HTTP_DISABLED:
            self.http = HttpServer(
                settings,
                self.servicer,
                self.pipeline,
                self._pool,
                _token(settings),
                self.serving,
                self.metrics,
                reuse_port=reuse_port,
            )
        self.http_port: int | None = None
        self._stopped = asyncio.Event()
        self._health_updates: set[asyncio.Task[None]] = set()

    def _add_services(self) -> None:
        explain_pb2_grpc.add_ExplainServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )

    def _bind(self) -> int:
        """Binds the gRPC port; a port taken by another process is a SettingsError."""
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = _credentials(self.settings)
        try:
            if credentials:
                return int(self.server.add_secure_port(address, credentials))
            return int(self.server.add_insecure_port(address))
        except RuntimeError as exc:  # gRPC's way of saying the bind failed
            raise SettingsError(
                f"port {address} is already in use or cannot be bound ({exc}); stop the process "
                "that holds it or choose another port"
            ) from None

    @property
    def registry(self) -> ModelRegistry:
        """This process's models (the one-process layout; tests read their queues)."""
        if not isinstance(self.backend, LocalBackend):
            raise AttributeError("the models live in the engine process")
        return self.backend.registry

    def serving(self) -> tuple[bool, dict[str, bool]]:
        """Whether the server serves (some model does), and each model: loaded, not failing,
        and the server not shutting down. The HTTP API's health; gRPC's follows the same rule."""
        running = not self._stopped.is_set()
        models = {
            s.name: running and s.meta is not None and s.serving for s in self.backend.statuses()
        }
        return any(models.values()), models

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        names = (model_health_name(s.name) for s in self.backend.statuses())
        for service in ("", SERVICE_NAME, *names):
            await self.health.set(service, status)

    def _model_health(self, model: str, serving: bool) -> None:
        """A model turned failing or recovered: its health name follows, and the server's
        overall status is NOT_SERVING while every model is failing."""
        if self._stopped.is_set():
            return
        overall = any(status.serving for status in self.backend.statuses())
        updates = {
            model_health_name(model): serving,
            "": overall,
            SERVICE_NAME: overall,
        }

        async def apply() -> None:
            for service, ok in updates.items():
                await self.health.set(service, _serving(ok))

        task = asyncio.get_running_loop().create_task(apply())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def start(self) -> None:
        """Starts answering (health NOT_SERVING), loads every model, then turns SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
        if self.settings.metrics_port != METRICS_DISABLED:
            self._metrics_server = self.metrics.serve(
                self.settings.host, self.settings.metrics_port
            )
            self.metrics_port = int(self._metrics_server.server_port)
        await self.backend.start(self._model_health)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.settings.ready_file:
            ready = {
                "port": self.port,
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
                "pid": os.getpid(),
            }
            _write_atomically(Path(self.settings.ready_file), json.dumps(ready))
        log.info(
            "serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
                "models": ",".join(s.name for s in self.backend.statuses()),
            },
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuses new calls, lets accepted ones finish (up to the grace period), releases all."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"grace_s": grace})
        # Calls that reached the server before this point but were not started yet would be
        # cancelled by server.stop(); draining first refuses them with a retryable UNAVAILABLE
        # while every started request runs to its answer.
        self.servicer.begin_drain()
        try:
            async with asyncio.timeout(grace):
                await self.servicer.wait_idle()
        except TimeoutError:
            log.warning("grace period over with requests still running")
        await asyncio.sleep(min(DRAIN_SETTLE_S, max(0.0, deadline - time.monotonic())))
        if self.http is not None and self.http_port is not None:
            await self.http.stop()
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        await self.backend.close()
        self._pool.shutdown(wait=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")


def _cuda_present() -> bool:
    import torch

    return bool(torch.cuda.is_available())


async def start_server(settings: Settings) -> CamServer | Supervisor:
    """A server listening and with every model loaded; on failure nothing is left running.
    With `frontends` > 0 (or auto beside a GPU) it is the multi-process layout's supervisor."""
    frontends = settings.resolved_frontends(_cuda_present())
    if frontends > 0:
        return await start_supervisor(settings, frontends)
    server = CamServer(settings)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await start_server(settings)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """The `camserve-server` command."""
    try:
        settings = load_settings(argv, os.environ)
    except SettingsError as exc:
        print(f"camserve-server: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.engine_threads:
        import torch

        torch.set_num_threads(settings.engine_threads)
    try:
        asyncio.run(serve(settings))
    except SettingsError as exc:
        log.error("bad configuration", extra={"error": str(exc)})
        return 2
    except Exception:
        log.exception("server failed")
        return 1
    return 0
