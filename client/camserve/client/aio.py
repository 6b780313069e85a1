"""The asyncio client (grpc.aio); same options, results and errors as the blocking `Client`.

`timeout` arguments become the gRPC call's deadline rather than an `asyncio.timeout`, so the
server sees the deadline too and stops working on calls nobody waits for any more.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from camserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_MESSAGE_BYTES,
    TLS,
    ChannelPool,
    Connection,
    PooledChannel,
)
from camserve.client.errors import CamserveError, from_rpc_error
from camserve.client.health import SERVING, decode_status, encode_request
from camserve.client.images import ImageInput
from camserve.client.kernels import Kernels, kernels_from_proto, kernels_request
from camserve.client.requests import (
    ExplainKwargs,
    ExplainOptions,
    build_request,
)
from camserve.client.results import (
    Explanation,
    ModelInfo,
    explanations_from_response,
    model_from_proto,
)
from camserve.client.retry import (
    DEFAULT_RETRY,
    NO_RETRY,
    RetryPolicy,
    call_with_retry_async,
    deadline_after,
)
from camserve.client.stream import Outcome, StreamScheduler
from camserve.v1 import explain_pb2 as pb

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of a camserve server; see `Client` for the options.

    The channels (`connections` of them) are opened on first use, inside the running event
    loop, and must be used from that loop only. Use `async with` (or `await close()`); a closed
    client refuses further calls.
    """

    def __init__(
        self,
        *,
        address: str = DEFAULT_ADDRESS,
        tls: TLS = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        max_send_bytes: int = DEFAULT_MESSAGE_BYTES,
        max_receive_bytes: int = DEFAULT_MESSAGE_BYTES,
        token: str | None = None,
        connections: int = 1,
    ) -> None:
        self._conn = Connection(
            address=address,
            tls=tls,
            timeout=timeout,
            retry=retry or NO_RETRY,
            max_send_bytes=max_send_bytes,
            max_receive_bytes=max_receive_bytes,
            token=token,
            connections=connections,
        )
        self._pool: ChannelPool[grpc.aio.Channel] | None = None
        self._closed = False

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def connections(self) -> int:
        """How many channels the client spreads its calls over."""
        return self._conn.connections

    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channels, cancelling calls still running; calling it again does nothing."""
        self._closed = True
        opened, self._pool = self._pool, None
        if opened is not None:
            await asyncio.gather(*(member.channel.close(grace=None) for member in opened))

    async def explain(
        self,
        image: ImageInput,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[ExplainKwargs],
    ) -> Explanation:
        """Explains one image; see `Client.explain`."""
        chosen = ExplainOptions(**options)
        results = await self._explain([image], chosen, timeout=timeout, request_id=request_id)
        return results[0]

    async def explain_batch(
        self,
        images: Sequence[ImageInput],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[ExplainKwargs],
    ) -> list[Explanation]:
        """Explains several images in one request; see `Client.explain_batch`."""
        return await self._explain(
            list(images), ExplainOptions(**options), timeout=timeout, request_id=request_id
        )

    def explain_many(
        self,
        images: Iterable[ImageInput],
        *,
        max_in_flight: int = 16,
        timeout: float | None = None,
        return_exceptions: bool = False,
        **options: Unpack[ExplainKwargs],
    ) -> AsyncIterator[Explanation | CamserveError]:
        """Explains a stream of images, yielding in input order; see `Client.explain_many`.

        Use as `async for explanation in client.explain_many(images): ...`.
        """
        self._check_open()
        scheduler = StreamScheduler(
            images,
            ExplainOptions(**options),
            max_in_flight=max_in_flight,
            retry=self._conn.retry,
            deadline=deadline_after(timeout),
            return_exceptions=return_exceptions,
        )
        return self._run_stream(scheduler, timeout=timeout)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server hosts."""
        request = pb.ListModelsRequest()
        response = await self._call(lambda c: c.stub.ListModels, request, timeout=timeout)
        return [model_from_proto(info) for info in response.models]

    async def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model by name; NotFound when the server has no such model."""
        request = pb.GetModelRequest(name=name)
        info = await self._call(lambda c: c.stub.GetModel, request, timeout=timeout)
        return model_from_proto(info)

    async def kernels(
        self,
        layer: str = "",
        *,
        model: str = "",
        weights: bool = True,
        grid: bool = True,
        page: int = 0,
        tiles_per_page: int = 0,
        tile_size: int = 0,
        timeout: float | None = None,
    ) -> Kernels:
        """A conv layer's weights (float32, out x in/groups x kh x kw) and one page of their grid
        PNG; `layer` empty: the model's first conv layer (`ModelInfo.conv_layers` lists them).
        `tiles_per_page` and `tile_size` 0: the server's defaults."""
        request = kernels_request(
            layer,
            model,
            weights=weights,
            grid=grid,
            page=page,
            tiles_per_page=tiles_per_page,
            tile_size=tile_size,
        )
        response = await self._call(lambda c: c.stub.GetKernels, request, timeout=timeout)
        return kernels_from_proto(response)

    async def health(self, *, service: str = "", timeout: float | None = None) -> bool:
        """True when the server (or `service`) reports SERVING; errors raise as usual."""
        return await self.health_status(service=service, timeout=timeout) == SERVING

    async def health_status(self, *, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        request = encode_request(service)
        data = await self._call(lambda c: c.health_check, request, timeout=timeout)
        return decode_status(data)

    async def _explain(
        self,
        images: list[ImageInput],
        options: ExplainOptions,
        *,
        timeout: float | None,
        request_id: str | None,
    ) -> list[Explanation]:
        request = build_request(images, options, request_id=request_id)
        response = await self._call(lambda c: c.stub.Explain, request, timeout=timeout)
        return explanations_from_response(response)

    async def _call(
        self,
        method: Callable[[PooledChannel[grpc.aio.Channel]], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        timeout: float | None,
    ) -> T:
        """One unary call; `method` picks the callable off a channel, and each attempt takes the
        pool's next channel, so calls (and retries) spread over every connection."""
        metadata = self._conn.metadata()

        async def attempt(time_left: float | None) -> T:
            call = method(self._open().next())
            try:
                return await call(request, timeout=time_left, metadata=metadata)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc

        return await call_with_retry_async(
            attempt, policy=self._conn.retry, timeout=self._conn.call_timeout(timeout)
        )

    async def _run_stream(
        self, scheduler: StreamScheduler, *, timeout: float | None
    ) -> AsyncIterator[Outcome]:
        stub = self._open().next().stub  # the whole stream runs on one channel
        call = stub.ExplainStream(timeout=timeout, metadata=self._conn.metadata())
        outgoing: asyncio.Queue[pb.ExplainRequest | None] = asyncio.Queue()
        # Writing runs beside reading, so a server that answers while it reads never waits on us.
        writer = asyncio.create_task(_write_all(call, outgoing))
        try:
            while not scheduler.finished:
                for request in scheduler.to_send(time.monotonic()):
                    outgoing.put_nowait(request)
                if scheduler.on_wire == 0:
                    await asyncio.sleep(scheduler.wait_s(time.monotonic()))
                    continue
                try:
                    response = await call.read()
                except grpc.RpcError as exc:
                    raise from_rpc_error(exc) from exc
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise scheduler.ended_early()
                scheduler.on_response(response, time.monotonic())
                for outcome in scheduler.ready():
                    yield outcome
            outgoing.put_nowait(None)
            await writer
            # Every answer is in: read the end of the stream so the call finishes cleanly.
            try:
                await call.read()
                await call.code()
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
        finally:
            call.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await writer

    def _open(self) -> ChannelPool[grpc.aio.Channel]:
        self._check_open()
        if self._pool is None:
            self._pool = self._conn.aio_channels()
        return self._pool

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this camserve AsyncClient has been closed; create a new one to make more calls"
            )


async def _write_all(call: Any, outgoing: asyncio.Queue[pb.ExplainRequest | None]) -> None:
    """Writes queued requests until None, then half-closes the stream."""
    while (request := await outgoing.get()) is not None:
        await call.write(request)
    await call.done_writing()
