"""The multi-process layout's parent: starts, watches and restarts the engine and frontends.

    supervisor ── engine process (models, batchers, engine, follow-up rows; one per device)
               ├─ frontend 0 ─┐  gRPC + HTTP on one port (SO_REUSEPORT), validation,
               ├─ frontend 1  │  decoding, preprocessing, shaping, serialisation
               └─ ...        ─┘  pixels in / maps out through each frontend's two rings

It owns everything the children share, so nothing leaks whichever child dies: the ports (held
without listening, see `ports`), the shared-memory rings (created here, unlinked on every exit
path of the supervisor), the engine's socket directory and the Prometheus multiprocess
directory, from which it serves the one aggregated /metrics. A child that dies is restarted:
the frontends reconnect to a new engine by themselves (failing what was in flight with
UNAVAILABLE meanwhile), and the other frontends keep serving while one restarts. `stop` drains
the frontends first (every accepted request is answered), then the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import glob
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from camserve.server import children
from camserve.server.ipc.names import FrontendRings
from camserve.server.ipc.rings import segment_bytes
from camserve.server.ports import reserve_port
from camserve.server.settings import HTTP_DISABLED, METRICS_DISABLED, Settings, SettingsError

log = logging.getLogger("camserve.supervisor")
KILL_AFTER_S = 5.0  # past the grace period, a child that has not exited is killed
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
QUICK_DEATH_S = 5.0  # a child dying sooner than this after starting backs off its restarts


class ChildFailed(RuntimeError):
    """A child process could not start (its own error, as it reported it)."""


@dataclasses.dataclass
class _Child:
    role: str  # "engine" or "frontend-N"
    process: BaseProcess
    ready: Connection
    started: float
    restarts: int = 0


class AggregatedMetrics:
    """The supervisor's view of every process's metrics (`registry` as the servers' own)."""

    def __init__(self, directory: str) -> None:
        from prometheus_client import CollectorRegistry, multiprocess

        self.directory = directory
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=directory)

    def serve(self, host: str, port: int) -> WSGIServer:
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def forget(self, pid: int | None) -> None:
        """Drops a dead process's live gauges (its counters keep counting in the totals)."""
        if pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)


class Supervisor:
    """A started multi-process server: `port`, `http_port`, `metrics_port`, `stop()`."""

    def __init__(self, settings: Settings, frontends: int) -> None:
        if frontends < 1:
            raise SettingsError(f"frontends={frontends}: the multi-process layout needs >= 1")
        self.settings = settings
        self.frontends = frontends
        self._context = multiprocessing.get_context("spawn")
        self._workdir = tempfile.mkdtemp(prefix="camserve-")
        self._socket_path = os.path.join(self._workdir, "engine.sock")
        self._metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
            self._workdir, "metrics"
        )
        self.metrics = AggregatedMetrics(self._prepare_metrics_dir())
        self._held: list[socket.socket] = []
        self._segments: list[shared_memory.SharedMemory] = []
        self._rings: list[FrontendRings] = []
        self._children: dict[str, _Child] = {}
        self._restarts: set[asyncio.Task[None]] = set()
        self._metrics_server: WSGIServer | None = None
        self._stopping = False
        self.port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._child_settings = settings
        # Every shared-memory segment of this supervisor is named with this prefix (several
        # supervisors may share a process).
        self.segment_prefix = f"camserve-{os.getpid()}-{id(self) & 0xFFFF:x}-"

    # -- what tests and operators read -----------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Each child's pid by role (engine, frontend-0, ...)."""
        return {role: child.process.pid or 0 for role, child in self._children.items()}

    @property
    def segment_names(self) -> list[str]:
        return [segment.name for segment in self._segments]

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reserves the ports, creates the rings, starts every child and waits until all of
        them serve; on failure nothing is left behind."""
        try:
            self._reserve_ports()
            self._create_rings()
            self._spawn("engine")
            for index in range(self.frontends):
                self._spawn(f"frontend-{index}")
            await asyncio.gather(*(self._await_ready(c) for c in list(self._children.values())))
            if self.settings.metrics_port != METRICS_DISABLED:
                self._metrics_server = self.metrics.serve(
                    self.settings.host, self.settings.metrics_port
                )
                self.metrics_port = int(self._metrics_server.server_port)
        except BaseException:
            await self.stop(0)
            raise
        for child in self._children.values():
            self._watch(child)
        self._write_ready_file()
        log.info(
            "serving",
            extra={
                "port": self.port,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "frontends": self.frontends,
                "models": ",".join(m.name for m in self.settings.models),
            },
        )

    def _prepare_metrics_dir(self) -> str:
        """The multiprocess directory, emptied of an earlier run's files."""
        os.makedirs(self._metrics_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(self._metrics_dir, "*.db")):
            os.unlink(stale)
        return self._metrics_dir

    def _reserve_ports(self) -> None:
        settings = self.settings
        grpc_socket = reserve_port(settings.host, settings.port, "port")
        self._held.append(grpc_socket)
        self.port = int(grpc_socket.getsockname()[1])
        http_port = settings.http_port
        if http_port != HTTP_DISABLED:
            http_socket = reserve_port(settings.host, http_port, "http_port")
            self._held.append(http_socket)
            http_port = self.http_port = int(http_socket.getsockname()[1])
        self._child_settings = dataclasses.replace(
            settings,
            port=self.port,
            http_port=http_port,
            metrics_port=METRICS_DISABLED,
            ready_file="",
            frontends=0,
        )

    def _create_rings(self) -> None:
        size = segment_bytes(self.settings.shm_ring_mb)
        for index in range(self.frontends):
            names = []
            for direction in ("pixels", "maps"):
                segment = shared_memory.SharedMemory(
                    name=f"{self.segment_prefix}{index}-{direction}", create=True, size=size
                )
                self._segments.append(segment)
                names.append(segment.name)
            self._rings.append(FrontendRings(pixels=names[0], maps=names[1]))

    def _spawn(self, role: str, restarts: int = 0) -> _Child:
        receiver, sender = self._context.Pipe(duplex=False)
        args: tuple[Any, ...]
        if role == "engine":
            target: Any = children.run_engine
            args = (self._child_settings, self._socket_path, self._metrics_dir, sender)
        else:
            index = int(role.rsplit("-", 1)[1])
            target = children.run_frontend
            args = (
                self._child_settings,
                index,
                self._socket_path,
                self._rings[index],
                self._metrics_dir,
                sender,
            )
        # Daemonic: should this process exit without `stop`, multiprocessing terminates them.
        process = self._context.Process(
            target=target, args=args, name=f"camserve-{role}", daemon=True
        )
        # The child may import prometheus_client before its entry point runs (spawn re-imports
        # a script's __main__, such as the camserve-server launcher), so the multiprocess
        # directory must already be in the environment it starts with, not in this process's.
        with _environment(PROMETHEUS_MULTIPROC_DIR=self._metrics_dir):
            process.start()
        sender.close()
        child = _Child(role, process, receiver, time.monotonic(), restarts)
        self._children[role] = child
        return child

    async def _await_ready(self, child: _Child) -> None:
        """Waits for the child's `ready`; ChildFailed (or SettingsError) with its reason."""
        loop = asyncio.get_running_loop()
        try:
            message = await loop.run_in_executor(None, child.ready.recv)
        except (EOFError, OSError):
            message = ("error", "fault", f"exited with code {child.process.exitcode}")
        finally:
            child.ready.close()
        if message[0] == "ready":
            log.info("child ready", extra={"child": child.role, "pid": message[1]})
            return
        _, kind, reason = message
        if kind == "settings":
            raise SettingsError(f"{child.role}: {reason}")
        raise ChildFailed(f"the {child.role} process failed to start: {reason}")

    def _write_ready_file(self) -> None:
        if not self.settings.ready_file:
            return
        ready = {
            "port": self.port,
            "metrics_port": self.metrics_port,
            "http_port": self.http_port,
            "pid": os.getpid(),
            "children": self.pids(),
        }
        path = Path(self.settings.ready_file)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(ready))
        partial.replace(path)

    # -- watching --------------------------------------------------------------------------

    def _watch(self, child: _Child) -> None:
        """Restarts `child` when it exits: its process sentinel turns readable (no polling)."""
        asyncio.get_running_loop().add_reader(child.process.sentinel, self._exited, child)

    def _exited(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.process.sentinel)
        child.process.join(0)  # reaps it, so its exit code is known
        if self._stopping or self._children.get(child.role) is not child:
            return
        task = loop.create_task(self._restart(child.role, child))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, role: str, child: _Child) -> None:
        lived = time.monotonic() - child.started
        restarts = child.restarts + 1 if lived < QUICK_DEATH_S else 0
        log.warning(
            "child exited; restarting",
            extra={"child": role, "exitcode": child.process.exitcode, "lived_s": round(lived, 1)},
        )
        self.metrics.forget(child.process.pid)
        # The dead child stays listed (and its Process open) until its successor replaces it,
        # so `pids` and `stop` can read it during the backoff.
        await asyncio.sleep(RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)])
        if self._stopping:
            return
        fresh = self._spawn(role, restarts)
        self._watch(fresh)
        task = asyncio.get_running_loop().create_task(self._await_ready(fresh))
        task.add_done_callback(functools.partial(_log_restart_failure, role))

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains the frontends (each answers what it accepted), then the engine; releases
        the ports, the rings and the directories."""
        if self._stopping and not self._children:
            return
        self._stopping = True
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        for child in self._children.values():
            with contextlib.suppress(ValueError, OSError):  # a closed or unwatched sentinel
                loop.remove_reader(child.process.sentinel)
        for task in list(self._restarts):
            task.cancel()
        frontends = [c for role, c in self._children.items() if role != "engine"]
        await self._terminate(frontends, grace + KILL_AFTER_S)
        engine = [c for role, c in self._children.items() if role == "engine"]
        await self._terminate(engine, KILL_AFTER_S + grace)
        self._children.clear()
        self._release()
        log.info("stopped")

    async def _terminate(self, group: list[_Child], within_s: float) -> None:
        for child in group:
            if child.process.exitcode is None:
                child.process.terminate()
        deadline = time.monotonic() + within_s
        loop = asyncio.get_running_loop()
        for child in group:
            left = max(0.0, deadline - time.monotonic())
            await loop.run_in_executor(None, child.process.join, left)
            if child.process.exitcode is None:
                log.warning("child did not drain in time; killing it", extra={"child": child.role})
                child.process.kill()
                await asyncio.get_running_loop().run_in_executor(None, child.process.join, 5)
            self.metrics.forget(child.process.pid)

    def _release(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        for held in self._held:
            held.close()
        self._held.clear()
        for segment in self._segments:
            segment.close()
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self._segments.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`values` in os.environ while a child is started (it copies the environment then)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _log_restart_failure(role: str, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("restarted child failed", extra={"child": role, "error": str(task.exception())})


async def start_supervisor(settings: Settings, frontends: int) -> Supervisor:
    """A multi-process server with every child serving."""
    supervisor = Supervisor(settings, frontends)
    await supervisor.start()
    return supervisor
