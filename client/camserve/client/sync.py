"""The blocking client."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from camserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_MESSAGE_BYTES,
    TLS,
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
    call_with_retry,
    deadline_after,
)
from camserve.client.stream import Outcome, StreamScheduler
from camserve.v1 import explain_pb2 as pb

T = TypeVar("T")
_CLOSE = object()


class Client:
    """A blocking client of a camserve server; safe to share between threads.

    Use it as a context manager (or call `close()`); a closed client refuses further calls.

    Options: `address` HOST:PORT. `tls`: None/False for plaintext (local use), True for TLS with
    the system's roots, a `TLSConfig` (own CA, client certificate) or `grpc.ChannelCredentials`.
    `timeout`: default seconds per call, retries included (None: no deadline). `retry`: how
    UNAVAILABLE and RESOURCE_EXHAUSTED are retried (None: not at all). `max_send_bytes` and
    `max_receive_bytes`: message size limits. `token`: sent as `authorization: Bearer <token>`.
    `connections`: how many channels (TCP connections) to open; unary calls take them in turn and
    a stream stays on one, so a server with several frontend processes on one port gets calls on
    each (HTTP/2 balances per connection, not per call).
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
        self._pool = self._conn.channels()
        self._closed = False

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def connections(self) -> int:
        """How many channels the client spreads its calls over."""
        return self._conn.connections

    def __enter__(self) -> Client:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channels; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            for member in self._pool:
                member.channel.close()

    def explain(
        self,
        image: ImageInput,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[ExplainKwargs],
    ) -> Explanation:
        """Explains one image.

        `image`: a file path, encoded bytes, a PIL image, a uint8 HxWx3 RGB array or a float32
        3xHxW normalised array. The keyword options (target, methods, resolution, ...) are
        described once, in `camserve.client.requests.ExplainKwargs`. `timeout`: this call's,
        instead of the client's.
        """
        chosen = ExplainOptions(**options)
        return self._explain([image], chosen, timeout=timeout, request_id=request_id)[0]

    def explain_batch(
        self,
        images: Sequence[ImageInput],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **options: Unpack[ExplainKwargs],
    ) -> list[Explanation]:
        """Explains several images in one request (batched together on the server).

        Takes the same keyword options as `explain`; every image gets the same target.
        """
        return self._explain(
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
    ) -> Iterator[Explanation | CamserveError]:
        """Explains a stream of images over one ExplainStream call, yielding in input order.

        At most `max_in_flight` images are sent and not yet yielded. A failed image raises its
        exception when its turn comes (or is yielded when `return_exceptions`). `timeout` bounds
        the whole stream; without it the stream has no deadline. Leaving the loop early cancels
        the call.
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

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server hosts."""
        response = self._call(lambda c: c.stub.ListModels, pb.ListModelsRequest(), timeout=timeout)
        return [model_from_proto(info) for info in response.models]

    def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model by name; NotFound when the server has no such model."""
        info = self._call(lambda c: c.stub.GetModel, pb.GetModelRequest(name=name), timeout=timeout)
        return model_from_proto(info)

    def kernels(
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
        return kernels_from_proto(self._call(lambda c: c.stub.GetKernels, request, timeout=timeout))

    def health(self, *, service: str = "", timeout: float | None = None) -> bool:
        """True when the server (or `service`) reports SERVING; errors raise as usual."""
        return self.health_status(service=service, timeout=timeout) == SERVING

    def health_status(self, *, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        data = self._call(lambda c: c.health_check, encode_request(service), timeout=timeout)
        return decode_status(data)

    def _explain(
        self,
        images: list[ImageInput],
        options: ExplainOptions,
        *,
        timeout: float | None,
        request_id: str | None,
    ) -> list[Explanation]:
        request = build_request(images, options, request_id=request_id)
        response = self._call(lambda c: c.stub.Explain, request, timeout=timeout)
        return explanations_from_response(response)

    def _call(
        self,
        method: Callable[[PooledChannel[grpc.Channel]], Callable[..., T]],
        request: Any,
        *,
        timeout: float | None,
    ) -> T:
        """One unary call; `method` picks the callable off a channel, and each attempt takes the
        pool's next channel, so calls (and retries) spread over every connection."""
        self._check_open()
        metadata = self._conn.metadata()

        def attempt(time_left: float | None) -> T:
            try:
                return method(self._pool.next())(request, timeout=time_left, metadata=metadata)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc

        return call_with_retry(
            attempt, policy=self._conn.retry, timeout=self._conn.call_timeout(timeout)
        )

    def _run_stream(
        self, scheduler: StreamScheduler, *, timeout: float | None
    ) -> Iterator[Outcome]:
        outgoing: queue.Queue[Any] = queue.Queue()

        def requests() -> Iterator[pb.ExplainRequest]:
            while (request := outgoing.get()) is not _CLOSE:
                yield request

        stub = self._pool.next().stub  # the whole stream runs on one channel
        call = stub.ExplainStream(requests(), timeout=timeout, metadata=self._conn.metadata())
        try:
            while not scheduler.finished:
                for request in scheduler.to_send(time.monotonic()):
                    outgoing.put(request)
                if scheduler.on_wire == 0:
                    time.sleep(scheduler.wait_s(time.monotonic()))
                    continue
                try:
                    response = next(call)
                except StopIteration:
                    raise scheduler.ended_early() from None
                except grpc.RpcError as exc:
                    raise from_rpc_error(exc) from exc
                scheduler.on_response(response, time.monotonic())
                yield from scheduler.ready()
            # Every answer is in: half-close and read the end so the call finishes cleanly.
            outgoing.put(_CLOSE)
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from exc
        finally:
            outgoing.put(_CLOSE)
            call.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this camserve Client has been closed; create a new one to make more calls"
            )
