"""The domain errors of an explain request: each names one way a request is refused or failed.

Refusals (`InvalidRequest`, `ModelNotFound`, `Overloaded`, ...) are the caller's to act on; a
`ServerFault` is the model's or the server's and never blames the request. The request checker
raises refusals; every other failure becomes one of these in `camserve.server.faults`, and the
servicer maps each class to one gRPC status code through a single table. Messages say what was
wrong and how to fix it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("camserve.errors")


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


def server_fault(exc: BaseException, model: str = "", reason: str = "") -> ServerFault:
    """The one answer to a failure inside the server, logged with its traceback.

    It names the model and the exception type (never the exception's own text, which may tell
    of the server's internals), or `reason` when the server knows what went wrong, and tells
    the caller the request was not at fault.
    """
    where = f"model {model!r}" if model else "the server"
    log.error(
        "request failed inside the server",
        extra={"model": model, "error": repr(exc)},
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return ServerFault(
        f"{where} failed while answering this request ({reason or type(exc).__name__}); this "
        "is a server fault, not the request's: retry, and report it if it persists"
    )
