"""The HTTP/JSON API's endpoints, each a thin conversion around the servicer's entry points.

`POST /v1/models/{model}:explain` parses its body into an ExplainRequest (`forms`) and answers
through `ExplainServicer.answer`, exactly as the Explain RPC does; the answer is the
ExplainResponse in protobuf's JSON mapping with the .proto's field names (tensor bytes base64),
converted on a worker thread so a large answer never holds the event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from aiohttp import web

from camserve.server import messages
from camserve.server.errors import DeadlineExceeded, InvalidRequest, Overloaded
from camserve.server.metrics import Metrics
from camserve.server.servicer import Answer, ExplainServicer
from camserve.server.settings import Settings
from camserve.server.web import forms
from camserve.server.web.encoding import response_json, to_json
from camserve.v1 import explain_pb2 as pb

if TYPE_CHECKING:
    from camserve.server.pipeline import ExplainPipeline

TIMEOUT_HEADER = "X-Timeout-S"
JSON = "application/json"
# A model's health, and the server's overall: True while serving.
HealthReport = Callable[[], tuple[bool, Mapping[str, bool]]]


def answer_json(answer: Answer) -> bytes:
    """The JSON of an ExplainResponse the servicer answered (serialised, or a message)."""
    if isinstance(answer, messages.EncodedResponse):
        return response_json(pb.ExplainResponse.FromString(answer.data))
    return to_json(answer)


def timeout_s(request: web.Request) -> float | None:
    """The caller's deadline in seconds from now (`X-Timeout-S`), None when it sets none."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise InvalidRequest(
            f"{TIMEOUT_HEADER}={raw!r}: give the seconds you will wait, a number above 0"
        )
    return value


class ApiRoutes:
    """The API's handlers over one server's servicer and pipeline."""

    def __init__(
        self,
        servicer: ExplainServicer,
        pipeline: ExplainPipeline,
        settings: Settings,
        pool: Executor,
        health: HealthReport,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._servicer = servicer
        self._pipeline = pipeline
        self._limits = settings.limits
        self._max_bytes = settings.max_message_bytes
        self._pool = pool
        self._health = health
        self._in_flight = 0

    def add_to(self, app: web.Application) -> None:
        # The explain route first: a GET on it is then "method not allowed", not a model name.
        app.router.add_post("/v1/models/{model:[^/:]+}:explain", self.explain)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:[^/:]+}", self.get_model)
        app.router.add_get("/v1/models/{model:[^/:]+}/kernels", self.kernels)
        app.router.add_get("/v1/health", self.health)

    async def explain(self, request: web.Request) -> web.Response:
        timeout = timeout_s(request)
        if self._in_flight >= self._limits.max_concurrent_rpcs:
            raise Overloaded(
                f"the server is answering {self._in_flight} HTTP requests, its limit "
                f"(limits.max_concurrent_rpcs); retry after 1s or lower your request rate",
                retry_after_s=1.0,
            )
        self._in_flight += 1
        try:
            message = await forms.explain_request(
                request, request.match_info["model"], self._limits, self._max_bytes
            )
            answer = await self._answer(message, timeout)
            if isinstance(answer, messages.EncodedResponse):
                self._metrics.observe_timing(answer.timing)
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self._pool, answer_json, answer)
        finally:
            self._in_flight -= 1
        return web.Response(body=body, content_type=JSON)

    async def _answer(self, message: pb.ExplainRequest, seconds: float | None) -> Answer:
        """The servicer's answer within the caller's deadline: a gRPC caller's channel gives up
        at its deadline, which cancels the call and frees its queue room; here the server
        does that itself."""
        try:
            async with asyncio.timeout(seconds):
                return await self._servicer.answer(message, seconds)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline passed: the request was not answered within {TIMEOUT_HEADER}="
                f"{seconds:g} s; allow more time or send fewer concurrent requests"
            ) from None

    async def list_models(self, request: web.Request) -> web.Response:
        models = [messages.model_info(status) for status in self._pipeline.statuses()]
        return web.Response(body=to_json(pb.ListModelsResponse(models=models)), content_type=JSON)

    async def get_model(self, request: web.Request) -> web.Response:
        status = self._pipeline.status(request.match_info["model"])
        return web.Response(body=to_json(messages.model_info(status)), content_type=JSON)

    async def kernels(self, request: web.Request) -> web.Response:
        """GetKernels over HTTP: query parameters as the request's fields; `format=png` answers
        the grid page itself (for an <img>), else the GetKernelsResponse as JSON."""
        query = request.query
        as_png = query.get("format", "json") == "png"
        message = forms.kernels_request(request.match_info["model"], query)
        if as_png:
            message.skip_weights = True
        answer = await self._servicer.kernels(message)
        if as_png:
            return web.Response(body=answer.grid_png, content_type="image/png")
        return web.Response(body=to_json(answer), content_type=JSON)

    async def health(self, request: web.Request) -> web.Response:
        serving, models = self._health()
        body = {
            "status": _serving(serving),
            "models": {name: _serving(ok) for name, ok in models.items()},
        }
        return web.json_response(body, status=200 if serving else 503)


def _serving(ok: bool) -> str:
    return "SERVING" if ok else "NOT_SERVING"
