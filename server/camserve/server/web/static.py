"""The page's files, read from this package once at start-up and served from memory.

Requests name a file of a fixed table; nothing is ever read from a path a request builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from aiohttp import web

# Every file the page consists of, with its content type.
FILES: dict[str, str] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "views.js": "text/javascript",
    "heatmaps.js": "text/javascript",
    "style.css": "text/css",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def load() -> dict[str, StaticFile]:
    """The page's files, from the package's `static` folder."""
    folder = resources.files(__package__).joinpath("static")
    return {
        name: StaticFile(folder.joinpath(name).read_bytes(), kind) for name, kind in FILES.items()
    }


class StaticFiles:
    """Serves `/` (the page) and `/static/{name}` from the loaded table."""

    def __init__(self) -> None:
        self._files = load()

    def response(self, name: str) -> web.Response:
        file = self._files.get(name)
        if file is None:
            raise web.HTTPNotFound(reason=f"no file {name!r}; the page is at /")
        return web.Response(
            body=file.body,
            content_type=file.content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def page(self, request: web.Request) -> web.Response:
        return self.response("index.html")

    async def file(self, request: web.Request) -> web.Response:
        return self.response(request.match_info["name"])
