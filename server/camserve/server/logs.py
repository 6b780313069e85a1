"""Structured log lines: the message plus the `extra` fields, as key=value text or JSON."""

from __future__ import annotations

import json
import logging

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`time level logger message key=value ...`, one line per event."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        line = f"{self.formatTime(record)} {level} {record.name} {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        if record.exc_info:
            extra += "\n" + self.formatException(record.exc_info)
        return f"{line} {extra}".rstrip()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class _ProcessField(logging.Filter):
    """Adds `process_role` (e.g. frontend-1) to every line, so the lines of the multi-process
    layout's processes, interleaved on one stderr, say whose they are."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_role = self._role
        return True


def configure(level: str, fmt: str, process_role: str = "") -> None:
    """Sends camserve's logs to stderr; called once by the command-line entry point and by each
    child process of the multi-process layout (with its role)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if process_role:
        handler.addFilter(_ProcessField(process_role))
    root = logging.getLogger("camserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
