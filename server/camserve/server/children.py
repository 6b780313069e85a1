"""The entry points of the multi-process layout's child processes: the engine and the frontends.

Started with the spawn method (never fork: torch, CUDA and gRPC threads do not survive a fork).
Each child first points prometheus_client at the supervisor's multiprocess directory (before
anything imports it), ties its life to the supervisor's, then reports `ready` or its error on
the pipe it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from camserve.server.settings import Settings, SettingsError

SAMPLE_EVERY_S = 0.1
_PR_SET_PDEATHSIG = 1


def _prepare(settings: Settings, metrics_dir: str, role: str, threads: int) -> None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # A child whose supervisor is killed gets SIGTERM and drains, never lingers.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        raise SystemExit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains
    from camserve.server import logs

    logs.configure(settings.log_level, settings.log_format, process_role=role)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _report(ready: Connection, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        ready.send(message)


async def _sample(
    metrics: Any,  # noqa: ANN401 - camserve.server.metrics.Metrics, imported late
    role: str,
    index: str,
    cuda: bool,
    backend: Any = None,  # noqa: ANN401 - the engine's LocalBackend
) -> None:
    """Writes this process's gauges, which a multiprocess registry cannot read at scrape time:
    its CPU time, CUDA memory and (in the engine) every model's queue depth."""
    while True:
        metrics.sample_process(role, index, cuda)
        if backend is not None:
            for runtime in backend.registry:
                metrics.queue_depth.labels(runtime.spec.name).set(runtime.queue_depth)
        await asyncio.sleep(SAMPLE_EVERY_S)


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def _failure(exc: BaseException) -> tuple[str, str, str]:
    return (
        "error",
        "settings" if isinstance(exc, SettingsError) else "fault",
        str(exc) or repr(exc),
    )


async def _engine(settings: Settings, socket_path: str, ready: Connection) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from camserve.server.compute import LocalBackend
    from camserve.server.engine_process import EngineService
    from camserve.server.metrics import Metrics

    metrics = Metrics()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weights")
    backend = LocalBackend(settings, metrics, pool)
    service = EngineService(backend, socket_path)
    try:
        await backend.start(service.broadcast_health)
        await service.start()
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which stops
        _report(ready, _failure(exc))
        raise
    cuda = any(
        status.meta and status.meta.device.startswith("cuda") for status in backend.statuses()
    )
    sampler = asyncio.get_running_loop().create_task(_sample(metrics, "engine", "0", cuda, backend))
    _report(ready, ("ready", os.getpid()))
    await _until_sigterm()
    sampler.cancel()
    await service.stop()
    pool.shutdown(wait=True)


def run_engine(settings: Settings, socket_path: str, metrics_dir: str, ready: Connection) -> None:
    """The engine process: every model and its batcher, for all frontends."""
    _prepare(settings, metrics_dir, "engine", settings.engine_threads)
    asyncio.run(_engine(settings, socket_path, ready))
    _exit_drained()


async def _frontend(
    settings: Settings,
    index: int,
    socket_path: str,
    rings: Any,
    ready: Connection,  # noqa: ANN401
) -> None:
    from camserve.server.app import CamServer
    from camserve.server.metrics import Metrics
    from camserve.server.remote import RemoteBackend

    metrics = Metrics()
    backend = RemoteBackend(settings, socket_path, rings, f"frontend-{index}")
    server = CamServer(settings, backend=backend, metrics=metrics, reuse_port=True)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor
        _report(ready, _failure(exc))
        await server.stop(0)
        raise
    sampler = asyncio.get_running_loop().create_task(
        _sample(metrics, "frontend", str(index), False)
    )
    _report(ready, ("ready", os.getpid()))
    await _until_sigterm()
    sampler.cancel()
    await server.stop()


def run_frontend(
    settings: Settings,
    index: int,
    socket_path: str,
    rings: Any,  # noqa: ANN401 - remote.FrontendRings, imported late (see the module docstring)
    metrics_dir: str,
    ready: Connection,
) -> None:
    """One gRPC frontend: protocol, validation, decoding, shaping; the engine does the rest."""
    _prepare(settings, metrics_dir, f"frontend-{index}", 1)
    asyncio.run(_frontend(settings, index, socket_path, rings, ready))
    _exit_drained()


def _exit_drained() -> NoReturn:
    """Ends a child that has drained, without the interpreter's teardown.

    Why: finalising an interpreter that holds torch, gRPC and a model took 1.6-1.9 s per
    process on a 2-core machine after everything was answered, and the supervisor stops the
    frontends before the engine, so a SIGTERM took the grace period plus 3-4 s. Nothing is
    left to do at exit: log lines are flushed here, metrics live in memory-mapped files, and
    the shared memory and the metrics of dead processes are the supervisor's to release.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)
