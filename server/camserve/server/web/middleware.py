"""What every HTTP answer goes through: JSON errors, security headers, CORS and the token.

Kept beside the routes, as gRPC's interceptors are beside the servicer, so each endpoint is
protected and answered alike.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from camserve.server.errors import ServiceError
from camserve.server.metrics import Metrics
from camserve.server.web.errors import (
    HTTP_STATUS_NAMES,
    STATUS_NAME_KEY,
    Unauthenticated,
    json_error,
    service_error_response,
)

log = logging.getLogger("camserve.http")
# The page and its files, the API's description and health need no token (the page asks for it).
OPEN_PATHS = ("/", "/openapi.json", "/v1/health")
OPEN_PREFIXES = ("/static/",)
# Scripts, styles and images only from this server; no framing, no plugins, no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
CORS_HEADERS = "Authorization, Content-Type, X-Timeout-S"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as `{code, status, message}`: domain errors with the gRPC API's message,
    aiohttp's own (no such path, wrong method, body too large) and faults alike."""
    try:
        return await handler(request)
    except ServiceError as error:
        return service_error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        name = HTTP_STATUS_NAMES.get(exc.status, "UNKNOWN")
        return json_error(exc.status, name, f"{request.method} {request.path}: {exc.reason}")
    except Exception:  # noqa: BLE001 - a bug must still get a precise answer
        log.exception("HTTP request failed inside the server", extra={"path": request.path})
        return json_error(
            500,
            "INTERNAL",
            "the server failed while answering this request; this is not the request's fault: "
            "retry, and report it if it persists",
        )


def observability(metrics: Metrics) -> Middleware:
    """Counts every HTTP request in `camserve_requests_total` (rpc "HTTP <method> <route>", the
    gRPC status name as code) and logs one line per request at debug level, as the gRPC
    interceptor does for RPCs."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        response = await handler(request)
        resource = request.match_info.route.resource
        rpc = f"HTTP {request.method} {resource.canonical if resource else 'unmatched'}"
        code = response.get(STATUS_NAME_KEY, "OK")
        metrics.requests.labels(rpc, code).inc()
        if log.isEnabledFor(logging.DEBUG):
            ms = round((time.monotonic() - started) * 1000, 2)
            log.debug("http", extra={"rpc": rpc, "code": code, "status": response.status, "ms": ms})
        return response

    return observe


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


def bearer_token(token: str) -> Middleware:
    """Refuses API calls without `Authorization: Bearer <token>` (never a query parameter)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or _open(request.path):
            return await handler(request)
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            raise Unauthenticated(
                "missing bearer token: send the header 'Authorization: Bearer <token>'"
                if not presented
                else "invalid bearer token"
            )
        return await handler(request)

    return check


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def cors(origins: tuple[str, ...]) -> Middleware:
    """Lets pages from `origins` (or any, with "*") call the API; answers their preflights."""

    def allowed(origin: str) -> bool:
        return bool(origin) and ("*" in origins or origin in origins)

    @web.middleware
    async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        preflight = (
            request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        )
        if preflight and allowed(origin):
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"
        return response

    return handle
