"""Request bytes that do not parse become a value the service can refuse precisely.

gRPC's own handling of a deserializer error is an UNKNOWN status ("Unexpected DecodeError") for
the whole call. With `tolerant`, a message that cannot be parsed arrives as an
`UnparsableRequest` instead: a unary call is refused with INVALID_ARGUMENT, and on a stream only
that request gets an INVALID_ARGUMENT answer while the stream goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class UnparsableRequest:
    """Bytes that did not parse as the RPC's request message, and why."""

    message_type: str
    reason: str
    request_id: str = ""  # unknown: the bytes never became a message

    def explain(self) -> str:
        return (
            f"request: could not parse the bytes as {self.message_type} ({self.reason}); send a "
            "message serialised from camserve/v1/explain.proto"
        )


def tolerant(deserializer: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """`deserializer`, returning an UnparsableRequest instead of raising on bad bytes."""

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return UnparsableRequest(message_type, str(exc) or type(exc).__name__)

    return parse
