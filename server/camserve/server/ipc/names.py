"""Names of the shared-memory segments a frontend is given (no imports: a child unpickles this
before it may import anything that reads its environment)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrontendRings:
    """The names of one frontend's two rings (created by the supervisor)."""

    pixels: str  # frontend -> engine: model inputs
    maps: str  # engine -> frontend: results
