"""Connection settings shared by the sync and asyncio clients: address, TLS, limits, token.

Both clients build one `Connection` from their keyword arguments and ask it for channel
credentials, channel options and per-call metadata, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from camserve.client.retry import DEFAULT_RETRY, RetryPolicy

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

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ValueError(f"address must be HOST:PORT; got {self.address!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None; got {self.timeout!r}")
        if self.max_send_bytes < 1 or self.max_receive_bytes < 1:
            raise ValueError("max_send_bytes and max_receive_bytes must be positive")
        if self.token is not None and (not self.token or "\n" in self.token):
            raise ValueError("token must be a non-empty single line")

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

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", self.max_send_bytes),
            ("grpc.max_receive_message_length", self.max_receive_bytes),
        ]
        if isinstance(self.tls, TLSConfig) and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options

    def channel(self) -> grpc.Channel:
        """A new blocking channel to `address`."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(self.address, options=self.channel_options())
        return grpc.secure_channel(self.address, credentials, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        """A new asyncio channel to `address`; create it inside the event loop that uses it."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=self.channel_options())
        return grpc.aio.secure_channel(self.address, credentials, options=self.channel_options())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token when one is set."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def call_timeout(self, timeout: float | None) -> float | None:
        """A call's own timeout, else the client's default."""
        return self.timeout if timeout is None else timeout
