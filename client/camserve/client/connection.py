"""Connection settings shared by the sync and asyncio clients: address, TLS, limits, token.

Both clients build one `Connection` from their keyword arguments and ask it for channel
credentials, channel options and per-call metadata, so the two cannot drift apart, and keep
their channels in one `ChannelPool`.

HTTP/2 balances per connection, not per call: a server running several frontend processes on
one port (SO_REUSEPORT) hands each TCP connection to one of them, so a client on one channel
reaches one process. With `connections` N > 1 the client opens N channels, each with its own
subchannel pool and a distinct channel argument, so gRPC opens N TCP connections rather than
sharing one; unary calls take the channels in turn, and a stream stays on the one it started on.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from camserve.client.health import CHECK_METHOD
from camserve.client.retry import DEFAULT_RETRY, RetryPolicy
from camserve.v1 import explain_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = bytes | str | os.PathLike[str] | None


def _pem(source: PemSource) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings; PEM material as bytes or file paths.

    `root_certificates` None uses the system's roots. `certificate_chain` and `private_key` (a
    client certificate) go together, for servers that verify clients. `server_name` overrides the
    name checked against the server's certificate (when dialling an IP address, say).
    """

    root_certificates: PemSource = None
    certificate_chain: PemSource = None
    private_key: PemSource = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key must be given together")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


TLS = TLSConfig | grpc.ChannelCredentials | bool | None

# An argument gRPC carries but never reads: channels that differ in it share no subchannel, even
# where a subchannel pool is shared.
CONNECTION_INDEX_ARG = "camserve.connection_index"


@dataclass(frozen=True)
class Connection:
    """Validated client settings; see `Client` for what each one means."""

    address: str = DEFAULT_ADDRESS
    tls: TLS = None
    timeout: float | None = 30.0
    retry: RetryPolicy = DEFAULT_RETRY
    max_send_bytes: int = DEFAULT_MESSAGE_BYTES
    max_receive_bytes: int = DEFAULT_MESSAGE_BYTES
    token: str | None = None
    connections: int = 1

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ValueError(f"address must be HOST:PORT; got {self.address!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None; got {self.timeout!r}")
        if self.max_send_bytes < 1 or self.max_receive_bytes < 1:
            raise ValueError("max_send_bytes and max_receive_bytes must be positive")
        if self.token is not None and (not self.token or "\n" in self.token):
            raise ValueError("token must be a non-empty single line")
        if (
            isinstance(self.connections, bool)
            or not isinstance(self.connections, int)
            or self.connections < 1
        ):
            raise ValueError(
                f"connections must be a whole number of at least 1; got {self.connections!r}"
            )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for a plaintext channel."""
        if self.tls is None or self.tls is False:
            return None
        if self.tls is True:
            return grpc.ssl_channel_credentials()
        if isinstance(self.tls, TLSConfig):
            return self.tls.credentials()
        if isinstance(self.tls, grpc.ChannelCredentials):
            return self.tls
        raise TypeError(
            "tls must be None/False (plaintext), True (system roots), a TLSConfig or "
            f"grpc.ChannelCredentials; got {type(self.tls).__name__}"
        )

    def channel_options(self, index: int = 0) -> list[tuple[str, int | str]]:
        """Options of channel `index` of `connections`; with more than one, each channel gets
        its own subchannel pool and a distinct argument, so each opens its own connection."""
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", self.max_send_bytes),
            ("grpc.max_receive_message_length", self.max_receive_bytes),
        ]
        if isinstance(self.tls, TLSConfig) and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        if self.connections > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
            options.append((CONNECTION_INDEX_ARG, index))
        return options

    def channels(self) -> ChannelPool[grpc.Channel]:
        """`connections` new blocking channels to `address`."""
        return ChannelPool(self._open_channels(grpc))

    def aio_channels(self) -> ChannelPool[grpc.aio.Channel]:
        """`connections` new asyncio channels; create them inside the event loop that uses them."""
        return ChannelPool(self._open_channels(grpc.aio))

    def _open_channels(self, api: Any) -> list[Any]:
        """`api` is `grpc` or `grpc.aio`: both spell channel creation the same way."""
        credentials = self.credentials()
        if credentials is None:
            return [
                api.insecure_channel(self.address, options=self.channel_options(index))
                for index in range(self.connections)
            ]
        return [
            api.secure_channel(self.address, credentials, options=self.channel_options(index))
            for index in range(self.connections)
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token when one is set."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def call_timeout(self, timeout: float | None) -> float | None:
        """A call's own timeout, else the client's default."""
        return self.timeout if timeout is None else timeout


C = TypeVar("C", grpc.Channel, grpc.aio.Channel)


@dataclass(frozen=True)
class PooledChannel(Generic[C]):
    """One channel and the callables made from it."""

    channel: C
    stub: explain_pb2_grpc.ExplainServiceStub
    health_check: Callable[..., Any]


class ChannelPool(Generic[C]):
    """The client's channels to one target, handed out in turn by `next()` (thread-safe)."""

    def __init__(self, channels: Sequence[C]) -> None:
        if not channels:
            raise ValueError("a ChannelPool needs at least one channel")
        self.members: tuple[PooledChannel[C], ...] = tuple(
            PooledChannel(
                channel=channel,
                stub=explain_pb2_grpc.ExplainServiceStub(channel),
                health_check=channel.unary_unary(
                    CHECK_METHOD, request_serializer=None, response_deserializer=None
                ),
            )
            for channel in channels
        )
        self._turns = itertools.count()  # next() on a count is atomic under the GIL

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[PooledChannel[C]]:
        return iter(self.members)

    def next(self) -> PooledChannel[C]:
        """The channel whose turn it is: round-robin over the pool."""
        return self.members[next(self._turns) % len(self.members)]
