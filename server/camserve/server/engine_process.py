"""The engine process: every model, its batcher and the engine, for all frontends at once.

It listens on a Unix socket. A frontend connects, says which shared-memory rings are its own
(`hello`), and learns the models (`models`). Each `explain` carries one request: its plan and
its images' model inputs (in the frontend's ring); the engine admits it, batches its images
with every other frontend's, runs the follow-up rows, and answers `done` with the results (in
the frontend's return ring) or `failed` with the domain error. Health changes of a model reach
every frontend (`health`). A frontend that goes away has its requests cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
from typing import Any

from camserve.server.backend import ComputedRequest
from camserve.server.compute import LocalBackend
from camserve.server.errors import InvalidRequest, ServiceError, server_fault
from camserve.server.ipc.channel import MessageTooLarge, RingSender, receive
from camserve.server.ipc.frames import read_frame
from camserve.server.ipc.rings import ShmRing

log = logging.getLogger("camserve.engine_process")


class FrontendSession:
    """One frontend's connection: its rings, its requests in progress."""

    def __init__(
        self,
        backend: LocalBackend,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._backend = backend
        self._reader = reader
        self._writer = writer
        self._requests: dict[int, asyncio.Task[None]] = {}
        self._pixels: ShmRing | None = None
        self._maps: ShmRing | None = None
        self._sender: RingSender | None = None
        self.name = "?"

    async def run(self) -> None:
        """Serves the connection until the frontend goes away; then cancels its requests."""
        try:
            hello = await read_frame(self._reader)
            _, self.name, pixels_ring, maps_ring = _plain(hello)
            self._pixels, self._maps = ShmRing.attach(pixels_ring), ShmRing.attach(maps_ring)
            self._sender = RingSender(self._writer, self._maps)
            await self.send(("models", self._backend.statuses()))
            log.info("frontend connected", extra={"frontend": self.name})
            while True:
                self._dispatch(receive(await read_frame(self._reader), self._pixels))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in list(self._requests.values()):
                task.cancel()
            self._writer.close()
            for ring in (self._pixels, self._maps):
                if ring is not None:
                    ring.close()
            log.info("frontend disconnected", extra={"frontend": self.name})

    def hang_up(self) -> None:
        self._writer.close()
        self._reader.feed_eof()

    async def send(self, message: object) -> None:
        assert self._sender is not None
        await self._sender.send(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "cancel":
            task = self._requests.get(message[1])
            if task is not None:
                task.cancel()
            return
        request_id = message[1]
        work = self._explain(*message[2:]) if kind == "explain" else self._weights(*message[2:])
        task = asyncio.get_running_loop().create_task(self._answer(request_id, work))
        self._requests[request_id] = task
        task.add_done_callback(lambda _: self._requests.pop(request_id, None))

    async def _answer(self, request_id: int, work: Any) -> None:  # noqa: ANN401 - a coroutine
        """Runs one request and sends its outcome; every failure is answered, never dropped."""
        try:
            result = await work
        except ServiceError as exc:
            outcome: tuple[object, ...] = ("failed", request_id, exc)
        except Exception as exc:  # noqa: BLE001 - answered as a server fault
            outcome = ("failed", request_id, server_fault(exc))
        else:
            outcome = ("done", request_id, result)
        try:
            await self.send(outcome)
        except MessageTooLarge as exc:
            await self.send(("failed", request_id, _too_large(exc)))

    async def _explain(
        self, model: str, plan: Any, pixels: list[Any], deadline: float | None
    ) -> ComputedRequest:
        meta = self._backend.status(model).meta
        if meta is None:  # never: the engine listens once its models are loaded
            raise server_fault(RuntimeError("model not loaded"), model)
        async with self._backend.admit(meta, plan) as admission:
            return await admission.compute(pixels, deadline)

    async def _weights(self, model: str, layer: str) -> Any:  # noqa: ANN401 - an array
        return await self._backend.conv_weights(model, layer)


def _plain(frame: bytes) -> tuple[Any, ...]:
    """A hello frame: a pickle of plain values, sent before the rings are known."""
    message = pickle.loads(frame[8:])  # noqa: S301 - from this server's own frontend process
    assert message[0] == "hello", message
    return tuple(message)


def _too_large(exc: MessageTooLarge) -> InvalidRequest:
    return InvalidRequest(
        f"output: the results of this request are too large to return: {exc}; ask for fewer "
        "images, classes, methods or feature maps, or raise the server's shm_ring_mb"
    )


class EngineService:
    """Serves the backend's models to every frontend that connects to `socket_path`."""

    def __init__(self, backend: LocalBackend, socket_path: str) -> None:
        self._backend = backend
        self._socket_path = socket_path
        self._sessions: set[FrontendSession] = set()
        self._no_sessions = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None

    def broadcast_health(self, model: str, serving: bool) -> None:
        """A model turned failing or recovered: every frontend's health follows."""
        for session in list(self._sessions):
            task = asyncio.get_running_loop().create_task(session.send(("health", model, serving)))
            task.add_done_callback(_ignore_closed)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._socket_path)  # a previous engine's, which died
        self._server = await asyncio.start_unix_server(self._serve, self._socket_path, limit=2**20)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = FrontendSession(self._backend, reader, writer)
        self._sessions.add(session)
        self._no_sessions.clear()
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if not self._sessions:
                self._no_sessions.set()

    async def stop(self) -> None:
        """Stops listening, lets the backend finish what it accepted, then hangs up on any
        frontend still connected (normally none: the supervisor drains them first)."""
        if self._server is not None:
            self._server.close()
        await self._backend.close()
        for session in list(self._sessions):
            session.hang_up()
        if self._sessions:
            await self._no_sessions.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._socket_path)


def _ignore_closed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("health not sent", extra={"error": repr(task.exception())})
