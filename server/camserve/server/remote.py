"""A frontend's view of the engine process (`camserve.server.backend.ModelBackend`).

It keeps one connection to the engine's socket and reconnects whenever it breaks: when the
engine process dies, every request in flight is failed at once with UNAVAILABLE (which clients
retry), the models report NOT_SERVING, and they serve again once the restarted engine answers.
Pixels go out through this frontend's pixel ring, results come back through its map ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import pickle
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import torch

from camserve.server.backend import ComputedRequest, HealthListener
from camserve.server.errors import InvalidRequest, ModelNotFound, Unavailable
from camserve.server.ipc.channel import MessageTooLarge, RingSender, receive
from camserve.server.ipc.frames import read_frame, write_frame
from camserve.server.ipc.names import FrontendRings
from camserve.server.ipc.rings import ShmRing
from camserve.server.records import ModelMeta, ModelStatus
from camserve.server.registry import unknown_model_message
from camserve.server.settings import Settings
from camserve.server.validation import ExplainPlan

log = logging.getLogger("camserve.remote")
RECONNECT_S = 0.05
_GONE = "the engine process went away (it is being restarted); retry"


class RemoteAdmission:
    """A request of this frontend, admitted by the engine when it arrives there."""

    def __init__(self, backend: RemoteBackend, meta: ModelMeta, plan: ExplainPlan) -> None:
        self._backend = backend
        self._meta = meta
        self._plan = plan

    async def compute(
        self, pixels: Sequence[torch.Tensor], deadline: float | None
    ) -> ComputedRequest:
        result = await self._backend.call(
            "explain", self._meta.name, self._plan, list(pixels), deadline
        )
        assert isinstance(result, ComputedRequest)
        return result


class RemoteBackend:
    """The models of the engine process, over its socket and this frontend's rings."""

    def __init__(
        self, settings: Settings, socket_path: str, rings: FrontendRings, name: str
    ) -> None:
        self._socket_path = socket_path
        self._name = name
        self._pixels = ShmRing.attach(rings.pixels)
        self._maps = ShmRing.attach(rings.maps)
        self._names = [model.name for model in settings.models]
        self._default = settings.default_model_name
        self._statuses: dict[str, ModelStatus] = {}
        self._connected = False
        self._listener: HealthListener | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._sender: RingSender | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    # -- ModelBackend --------------------------------------------------------------------

    def statuses(self) -> list[ModelStatus]:
        return [self._status(name) for name in self._names]

    def status(self, name: str) -> ModelStatus:
        name = name or self._default
        if name not in self._names:
            raise ModelNotFound(unknown_model_message(name, self._names))
        return self._status(name)

    @contextlib.asynccontextmanager
    async def admit(self, meta: ModelMeta, plan: ExplainPlan) -> AsyncIterator[RemoteAdmission]:
        if not self._connected:
            raise Unavailable(f"model {meta.name!r}: {_GONE}")
        yield RemoteAdmission(self, meta, plan)

    async def conv_weights(self, model: str, layer: str) -> np.ndarray:
        weights = await self.call("weights", model, layer)
        assert isinstance(weights, np.ndarray)
        return weights

    async def start(self, on_health: HealthListener) -> None:
        """Connects (retrying while the engine loads) and returns once the models are known."""
        self._listener = on_health
        self._task = asyncio.get_running_loop().create_task(self._stay_connected())
        await self._first.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending()
        for ring in (self._pixels, self._maps):
            ring.close()

    # -- calls -----------------------------------------------------------------------------

    async def call(self, kind: str, *args: object) -> Any:  # noqa: ANN401 - the engine's answer
        """Sends one request to the engine and waits for its answer (or its error)."""
        if not self._connected or self._sender is None:
            raise Unavailable(_GONE)
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await self._sender.send((kind, request_id, *args))
            except MessageTooLarge as exc:
                raise InvalidRequest(
                    f"images: this request's model inputs are too large to hand to the engine: "
                    f"{exc}; send fewer or smaller images, or raise the server's shm_ring_mb"
                ) from None
            except ConnectionError:
                raise Unavailable(_GONE) from None
            return await future
        except asyncio.CancelledError:
            self._cancel(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)

    def _cancel(self, request_id: int) -> None:
        """Tells the engine a caller went away, so its queued images leave the batch."""
        if self._connected and self._sender is not None:
            task = asyncio.get_running_loop().create_task(self._sender.send(("cancel", request_id)))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- the connection --------------------------------------------------------------------

    def _status(self, name: str) -> ModelStatus:
        known = self._statuses.get(name)
        if known is None:
            return ModelStatus(name=name, version="", max_batch_size=0, meta=None, serving=False)
        return dataclasses.replace(known, serving=known.serving and self._connected)

    async def _stay_connected(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self._socket_path, limit=2**20)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._session(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            finally:
                writer.close()
                self._lost()
            await asyncio.sleep(RECONNECT_S)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._pixels.reset()
        self._maps.reset()
        hello = ("hello", self._name, self._pixels.segment.name, self._maps.segment.name)
        write_frame(writer, bytes(8) + pickle.dumps(hello))
        kind, statuses = receive(await read_frame(reader), self._maps)
        assert kind == "models", kind
        self._statuses = {status.name: status for status in statuses}
        self._sender = RingSender(writer, self._pixels)
        self._connected = True
        self._first.set()
        log.info("connected to the engine", extra={"frontend": self._name})
        self._tell_health()
        while True:
            self._handle(receive(await read_frame(reader), self._maps))

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "health":
            _, model, serving = message
            if model in self._statuses:
                self._statuses[model] = dataclasses.replace(self._statuses[model], serving=serving)
            if self._listener is not None:
                self._listener(model, serving)
            return
        future = self._pending.get(message[1])
        if future is None or future.done():
            return  # its caller went away
        if kind == "done":
            future.set_result(message[2])
        else:
            future.set_exception(message[2])

    def _lost(self) -> None:
        was_connected = self._connected
        self._connected = False
        self._sender = None
        self._fail_pending()
        if was_connected:
            log.warning("lost the engine process", extra={"frontend": self._name})
            self._tell_health()

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(_GONE))
        self._pending.clear()

    def _tell_health(self) -> None:
        if self._listener is None:
            return
        for status in self.statuses():
            self._listener(status.name, status.serving)
