"""The HTTP server: an aiohttp application on the gRPC server's own event loop.

It shares the process's servicer, pipeline, CPU pool, limits, token and TLS certificate with
gRPC; only the port differs (`server.http_port`).
"""

from __future__ import annotations

import json
import ssl
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from camserve.server.metrics import Metrics
from camserve.server.settings import Settings, SettingsError
from camserve.server.web import middleware
from camserve.server.web.openapi import document
from camserve.server.web.routes import ApiRoutes, HealthReport
from camserve.server.web.static import StaticFiles

if TYPE_CHECKING:
    from camserve.server.pipeline import ExplainPipeline
    from camserve.server.servicer import ExplainServicer

# Requests still running when the HTTP server stops get this long (the servicer's drain has
# already waited for started explanations within the grace period).
SHUTDOWN_TIMEOUT_S = 5.0


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC server's certificate (and client CA, for mutual TLS) for HTTPS; None without."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file:
            context.load_verify_locations(settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot use the TLS files for HTTPS: {exc}") from None
    return context


def application(
    settings: Settings, routes: ApiRoutes, token: str, static: StaticFiles, metrics: Metrics
) -> web.Application:
    """The aiohttp application: middlewares outermost first, then the routes."""
    middlewares: list[Middleware] = [middleware.observability(metrics), middleware.security_headers]
    if settings.cors_origins:
        middlewares.append(middleware.cors(settings.cors_origins))
    middlewares.append(middleware.json_errors)
    if token:
        middlewares.append(middleware.bearer_token(token))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_message_bytes)
    routes.add_to(app)
    openapi = json.dumps(document()).encode()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/", static.page)
    app.router.add_get("/static/{name}", static.file)
    return app


class HttpServer:
    """The started HTTP API and page; `port` is the bound port."""

    def __init__(
        self,
        settings: Settings,
        servicer: ExplainServicer,
        pipeline: ExplainPipeline,
        pool: Executor,
        token: str,
        health: HealthReport,
        metrics: Metrics,
        reuse_port: bool = False,
    ) -> None:
        self._settings = settings
        self._reuse_port = reuse_port  # the multi-process layout's frontends share the port
        routes = ApiRoutes(servicer, pipeline, settings, pool, health, metrics)
        self._runner = web.AppRunner(
            application(settings, routes, token, StaticFiles(), metrics),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        self.port = 0

    async def start(self) -> int:
        """Listens on `server.host`:`server.http_port` and returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._settings.host,
            self._settings.http_port,
            ssl_context=tls_context(self._settings),
            reuse_port=self._reuse_port or None,
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stops listening and lets requests in progress finish (within the shutdown timeout)."""
        await self._runner.cleanup()
