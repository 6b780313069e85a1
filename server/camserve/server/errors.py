"""The domain errors of an explain request: each names one way a request is refused.

The pipeline and the request checker raise them; the servicer maps each class to one gRPC
status code through a single table. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the server answers with an error; `retry_after_s` > 0 suggests a retry delay."""

    retry_after_s: float = 0.0

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidRequest(ServiceError):
    """The request itself is wrong (a field, an image, a layer): fix it before retrying."""


class ModelNotFound(ServiceError):
    """The request names a model this server does not host."""


class Unavailable(ServiceError):
    """The model is loading, failing, or the server is draining: retry, here or elsewhere."""


class Overloaded(ServiceError):
    """The model's queue cannot take the request now; retry after `retry_after_s`."""


class OutOfMemory(ServiceError):
    """The device ran out of memory even for this request alone."""


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the request was computed."""


class ServerFault(ServiceError):
    """Something failed inside the server; not the caller's fault."""
