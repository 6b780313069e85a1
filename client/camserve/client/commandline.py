"""What the command-line tools (`camserve`, `camserve-loadtest`) share for a user's mistakes:
each is one line on stderr and an exit status, never a traceback."""

from __future__ import annotations

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def describe_os_error(exc: Exception) -> str:
    """One line for a file error ("No such file or directory: 'x.png'"), else the message."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {str(exc.filename)!r}"
    return str(exc)
