"""The HTTP/JSON API against real servers: each endpoint, each error status, and answers equal
to gRPC's for the same request.

Two servers: the shared one (built-in model and a seeded resnet18, no token) for the answers,
and one for the refusals: the gated model (its forward pass waits on a gate, so queueing and
deadlines are decided by the test), a 1 MiB message limit, a bearer token, HTTPS and one
allowed CORS origin.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format

from camserve.server.settings import LimitsSettings
from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support import gated_model
from tests._support.servers import (
    CAT_BYTES,
    CAT_JPEG,
    ServerThread,
    gated_settings,
    http_url,
    png_bytes,
    seeded_images,
)
from tests._support.traffic import wait_until

pytestmark = pytest.mark.timeout(240)

TOKEN = "s3cret-token"
ORIGIN = "https://dashboard.example"
SMALL = png_bytes(seeded_images(1, size=(32, 32), seed=5)[0])
MIB = 2**20


def comparable(response: pb.ExplainResponse) -> pb.ExplainResponse:
    """The answer without what differs between two computations of it (times, batch sizes)."""
    response.ClearField("timing")
    response.ClearField("batch_size")
    return response


async def grpc_explain(server: ServerThread, request: pb.ExplainRequest) -> pb.ExplainResponse:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=120)


async def grpc_error(server: ServerThread, request: pb.ExplainRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_explain(server, request)
    return caught.value


# ------------------------------------------------------------------------- endpoints, answers


CAT_REQUEST = pb.ExplainRequest(
    model="efficientnet-lite0",
    images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(top_k=2))],
    methods=[pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM],
    output=pb.OutputOptions(
        resolution=pb.RESOLUTION_INPUT,
        scores=[pb.SCORE_CONFIDENCE_CHANGE, pb.SCORE_DELETION_AUC],
        score_steps=10,
        score_curves=True,
        overlay=True,
    ),
    top_predictions=3,
    request_id="cat-http",
)


async def test_json_explain_equals_the_grpc_answer(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    body = json_format.MessageToJson(CAT_REQUEST, preserving_proto_field_name=True)
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
        assert reply.status == 200, await reply.text()
        assert reply.content_type == "application/json"
        answer = await reply.json()
    assert answer["request_id"] == "cat-http"
    heatmap = answer["results"][0]["heatmaps"][0]
    assert set(heatmap) >= {"method", "class_index", "data", "deletion_auc", "deletion_curve"}
    assert heatmap["data"]["shape"] == ["224", "224"]  # int64 as strings, as the mapping says
    assert len(base64.b64decode(heatmap["data"]["data"])) == 224 * 224 * 4
    over_http = json_format.ParseDict(answer, pb.ExplainResponse())
    over_grpc = await grpc_explain(camserve_server, CAT_REQUEST)
    assert comparable(over_http) == comparable(over_grpc)


async def test_a_multipart_upload_is_the_same_request(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData()
    form.add_field(
        "image", CAT_JPEG.read_bytes(), filename="chelsea.jpg", content_type="image/jpeg"
    )
    for name, value in (
        ("methods", "gradcam"),
        ("methods", "METHOD_LAYERCAM"),
        ("target.top_k", "2"),
        ("output.resolution", "input"),
        ("output.scores", "confidence_change"),
        ("output.scores", "deletion-auc"),
        ("output.score_steps", "10"),
        ("output.score_curves", "true"),
        ("output.overlay", "on"),
        ("top_predictions", "3"),
        ("request_id", "cat-http"),
    ):
        form.add_field(name, value)
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    async with http.post(url, data=form) as reply:
        assert reply.status == 200, await reply.text()
        over_http = json_format.ParseDict(await reply.json(), pb.ExplainResponse())
    assert over_http.results[0].overlay_png.startswith(b"\x89PNG")
    assert 281 <= over_http.results[0].predictions[0].index <= 285  # a tabby or Egyptian cat
    over_grpc = await grpc_explain(camserve_server, CAT_REQUEST)
    assert comparable(over_http) == comparable(over_grpc)


PIXEL_REQUEST = pb.ExplainRequest(
    model="efficientnet-lite0",
    images=[pb.Image(encoded=CAT_BYTES, target=pb.Target(class_indices=[285]))],
    methods=[pb.METHOD_GUIDED_GRADCAM, pb.METHOD_INTEGRATED_GRADIENTS],
    output=pb.OutputOptions(resolution=pb.RESOLUTION_INPUT),
    pixel_attribution=pb.SaliencyOptions(steps=4, reduction=pb.REDUCTION_SUM_ABS),
    request_id="pixels-http",
)


async def test_pixel_attributions_by_json_and_by_form_equal_the_grpc_answer(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    """The HTTP API takes the new method names and options from the .proto like any other."""
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    body = json_format.MessageToJson(PIXEL_REQUEST, preserving_proto_field_name=True)
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
        assert reply.status == 200, await reply.text()
        by_json = json_format.ParseDict(await reply.json(), pb.ExplainResponse())
    form = aiohttp.FormData()
    form.add_field("image", CAT_BYTES, filename="chelsea.jpg", content_type="image/jpeg")
    for name, value in (
        ("methods", "guided_gradcam"),
        ("methods", "integrated_gradients"),
        ("target.class_indices", "285"),
        ("output.resolution", "input"),
        ("pixel_attribution.steps", "4"),
        ("pixel_attribution.reduction", "sum_abs"),
        ("request_id", "pixels-http"),
    ):
        form.add_field(name, value)
    async with http.post(url, data=form) as reply:
        assert reply.status == 200, await reply.text()
        by_form = json_format.ParseDict(await reply.json(), pb.ExplainResponse())
    over_grpc = await grpc_explain(camserve_server, PIXEL_REQUEST)
    guided, integrated = over_grpc.results[0].heatmaps
    assert list(guided.data.shape) == [224, 224]
    assert integrated.HasField("convergence_delta")
    assert comparable(by_json) == comparable(over_grpc)
    assert comparable(by_form) == comparable(over_grpc)


async def test_models_model_and_health(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    async with grpc.aio.insecure_channel(camserve_server.address) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        listed = await stub.ListModels(pb.ListModelsRequest())
        resnet = await stub.GetModel(pb.GetModelRequest(name="resnet18"))
    async with http.get(http_url(camserve_server, "/v1/models")) as reply:
        assert reply.status == 200
        assert json_format.ParseDict(await reply.json(), pb.ListModelsResponse()) == listed
    async with http.get(http_url(camserve_server, "/v1/models/resnet18")) as reply:
        assert reply.status == 200
        info = await reply.json()
    assert json_format.ParseDict(info, pb.ModelInfo()) == resnet
    assert info["default_layer"] == "layer4"
    assert "METHOD_SCORECAM" in info["methods"]
    async with http.get(http_url(camserve_server, "/v1/health")) as reply:
        assert reply.status == 200
        assert await reply.json() == {
            "status": "SERVING",
            "models": {"efficientnet-lite0": "SERVING", "resnet18": "SERVING"},
        }


async def test_openapi_document_describes_the_api_from_the_proto(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    async with http.get(http_url(camserve_server, "/openapi.json")) as reply:
        assert reply.status == 200
        document = await reply.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/v1/models",
        "/v1/models/{model}",
        "/v1/models/{model}/kernels",
        "/v1/models/{model}:explain",
        "/v1/health",
    }
    explain = document["paths"]["/v1/models/{model}:explain"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(explain["responses"])
    schemas = document["components"]["schemas"]
    assert set(schemas["ExplainRequest"]["properties"]) == set(
        pb.ExplainRequest.DESCRIPTOR.fields_by_name
    )
    assert schemas["Heatmap"]["properties"]["method"]["enum"][1] == "METHOD_GRADCAM"


async def test_page_and_files_come_from_the_package_with_a_strict_policy(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    async with http.get(http_url(camserve_server, "/")) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/html"
        policy = reply.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        page = await reply.text()
    assert '<script type="module" src="/static/app.js">' in page
    assert "<script>" not in page  # no inline script
    async with http.get(http_url(camserve_server, "/static/app.js")) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/javascript"
    for path in ("/static/..%2Fserver.py", "/static/%2e%2e/routes.py", "/static/nothing.js"):
        async with http.get(http_url(camserve_server, path)) as reply:
            assert reply.status == 404, path
            assert (await reply.json())["code"] == 404
    headers = {"Origin": ORIGIN}
    async with http.get(http_url(camserve_server, "/v1/models"), headers=headers) as reply:
        assert "Access-Control-Allow-Origin" not in reply.headers  # CORS is off unless configured


# ---------------------------------------------------------------------------- refusals, 4xx


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"{not json", "application/json", 400, "not an ExplainRequest in protobuf's JSON"),
        (b'{"images": 3}', "application/json", 400, "repeated field images must be in []"),
        (b"x", "text/plain", 415, "content type 'text/plain' is not read here"),
    ],
)
async def test_bodies_that_are_not_requests(
    camserve_server: ServerThread,
    http: aiohttp.ClientSession,
    body: bytes,
    content_type: str,
    status: int,
    words: str,
) -> None:
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as reply:
        assert reply.status == status
        error = await reply.json()
    assert error["code"] == status
    assert error["status"] == "INVALID_ARGUMENT"
    assert words in error["message"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ExplainRequest(images=[pb.Image(encoded=b"just some text\n")]), None),
        (pb.ExplainRequest(images=[pb.Image(encoded=CAT_BYTES)], layer="nope"), None),
        (pb.ExplainRequest(), None),
        (pb.ExplainRequest(model="resnet18", images=[pb.Image(encoded=CAT_BYTES)]), "model"),
    ],
    ids=["text-file", "unknown-layer", "no-images", "model-mismatch"],
)
async def test_refusals_carry_the_grpc_message(
    camserve_server: ServerThread,
    http: aiohttp.ClientSession,
    request_: pb.ExplainRequest,
    field: str | None,
) -> None:
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    body = json_format.MessageToJson(request_)
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
        assert reply.status == 400
        error = await reply.json()
    assert error["status"] == "INVALID_ARGUMENT"
    if field == "model":
        assert error["message"].startswith("model: the body names 'resnet18'")
        return
    request_.model = "efficientnet-lite0"
    failure = await grpc_error(camserve_server, request_)
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error["message"] == failure.details()


async def test_unknown_form_fields_and_values_are_named(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    for name, value, words in (
        ("colour", "red", "form field 'colour' is not an option; use 'image' for image files"),
        ("output.raw", "maybe", "form field 'output.raw'='maybe': expected true or false"),
        ("methods", "fancycam", "form field 'methods'='fancycam': use one of gradcam,"),
        ("layer", "a", "form field 'layer' takes one value, got 2"),
    ):
        form = aiohttp.FormData()
        form.add_field("image", SMALL, filename="small.png", content_type="image/png")
        form.add_field(name, value)
        if name == "layer":
            form.add_field(name, "b")
        async with http.post(url, data=form) as reply:
            assert reply.status == 400
            assert words in (await reply.json())["message"]


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        ("multipart/form-data", b"abc", "boundary missed"),
        ("multipart/form-data; boundary=XX", b"abc", "Could not find starting boundary"),
    ],
)
async def test_forms_that_do_not_parse_are_400(
    camserve_server: ServerThread,
    http: aiohttp.ClientSession,
    content_type: str,
    body: bytes,
    words: str,
) -> None:
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as reply:
        assert reply.status == 400
        message = (await reply.json())["message"]
    assert message.startswith("request body: not a readable multipart form")
    assert words in message


async def test_a_long_option_field_is_refused_by_name(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData()
    form.add_field("image", SMALL, filename="small.png", content_type="image/png")
    form.add_field("layer", "x" * 70_000)
    url = http_url(camserve_server, "/v1/models/efficientnet-lite0:explain")
    async with http.post(url, data=form) as reply:
        assert reply.status == 400
        error = await reply.json()
    assert error["message"] == "form field 'layer': over 65536 bytes; option fields are short text"


async def test_not_found_and_wrong_method(
    camserve_server: ServerThread, http: aiohttp.ClientSession
) -> None:
    explain_rpc = "HTTP POST /v1/models/{model}:explain"
    refused = camserve_server.metric("camserve_requests_total", rpc=explain_rpc, code="NOT_FOUND")
    request = pb.ExplainRequest(model="nope", images=[pb.Image(encoded=SMALL)])
    failure = await grpc_error(camserve_server, request)
    body = json_format.MessageToJson(pb.ExplainRequest(images=[pb.Image(encoded=SMALL)]))
    headers = {"Content-Type": "application/json"}
    url = http_url(camserve_server, "/v1/models/nope:explain")
    async with http.post(url, data=body, headers=headers) as reply:
        assert reply.status == 404
        assert await reply.json() == {
            "code": 404,
            "status": "NOT_FOUND",
            "message": failure.details(),
        }
    counted = camserve_server.metric("camserve_requests_total", rpc=explain_rpc, code="NOT_FOUND")
    assert counted == refused + 1  # HTTP requests are counted beside the RPCs
    async with http.get(http_url(camserve_server, "/v1/models/nope")) as reply:
        assert reply.status == 404
        assert (await reply.json())["message"] == failure.details()
    async with http.get(http_url(camserve_server, "/v1/models/resnet18:explain")) as reply:
        assert reply.status == 405
        assert (await reply.json())["code"] == 405


# ------------------------------------------------------ the guarded server: token, TLS, limits


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert, key_file = folder / "server.crt", folder / "server.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_file


@pytest.fixture(scope="module")
def guarded(
    test_settings: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, ssl.SSLContext]]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    gated_model.GATE.set()  # the warm-up pass must get through
    server = ServerThread(
        test_settings(
            models=(gated_settings(max_queue=2),),
            metrics_port=-1,
            limits=LimitsSettings(max_images_per_request=2),
            max_message_mb=1,
            auth_token=TOKEN,
            tls_cert_file=str(cert),
            tls_key_file=str(key),
            http_cors_origins=ORIGIN,
        )
    )
    trust = ssl.create_default_context(cafile=str(cert))
    yield server, trust
    gated_model.GATE.set()
    server.stop(grace=1.0)


@pytest.fixture
def gate() -> Iterator[None]:
    """The gated model's gate, closed for the test and opened after it."""
    gated_model.ENTERED.clear()
    gated_model.GATE.clear()
    yield
    gated_model.GATE.set()


def _json(images: list[bytes]) -> str:
    return json_format.MessageToJson(
        pb.ExplainRequest(images=[pb.Image(encoded=i) for i in images])
    )


class Guarded:
    """Calls to the guarded server over HTTPS, with the token unless told otherwise."""

    def __init__(self, server: ServerThread, trust: ssl.SSLContext, http: aiohttp.ClientSession):
        self.server, self.trust, self.http = server, trust, http

    def url(self, path: str) -> str:
        return http_url(self.server, path, "https")

    async def explain(self, body: Any, **headers: str) -> tuple[int, dict[str, Any], Any]:
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            **headers,
        }
        url = self.url("/v1/models/gated:explain")
        async with self.http.post(url, data=body, headers=headers, ssl=self.trust) as reply:
            return reply.status, await reply.json(), reply.headers


@pytest.fixture
def guard(guarded: tuple[ServerThread, ssl.SSLContext], http: aiohttp.ClientSession) -> Guarded:
    return Guarded(*guarded, http)


async def test_token_and_tls_guard_the_api_but_not_the_page(guard: Guarded) -> None:
    status, answer, _ = await guard.explain(_json([SMALL]))
    assert status == 200
    assert len(answer["results"]) == 1
    for headers, words in (
        (
            {"Authorization": ""},
            "missing bearer token: send the header 'Authorization: Bearer <token>'",
        ),
        ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
    ):
        status, error, reply_headers = await guard.explain(_json([SMALL]), **headers)
        assert (status, error["status"], error["message"]) == (401, "UNAUTHENTICATED", words)
        assert reply_headers["WWW-Authenticate"].startswith("Bearer")
    async with guard.http.get(guard.url("/v1/models"), ssl=guard.trust) as reply:
        assert reply.status == 401
    for path in ("/", "/static/app.js", "/openapi.json", "/v1/health"):
        async with guard.http.get(guard.url(path), ssl=guard.trust) as reply:
            assert reply.status == 200, path
    with pytest.raises(aiohttp.ClientError):  # plaintext to the HTTPS port
        async with guard.http.get(http_url(guard.server, "/v1/health")) as reply:
            await reply.read()


async def test_cors_allows_only_the_configured_origin(guard: Guarded) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    url = guard.url("/v1/models/gated:explain")
    async with guard.http.options(url, headers=preflight, ssl=guard.trust) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in reply.headers["Access-Control-Allow-Headers"]
    status, _, headers = await guard.explain(_json([SMALL]), Origin=ORIGIN)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    _, _, headers = await guard.explain(_json([SMALL]), Origin="https://elsewhere.example")
    assert "Access-Control-Allow-Origin" not in headers


async def test_bodies_over_the_message_limit_are_refused_before_they_are_read(
    guard: Guarded,
) -> None:
    big = b"\xff" * (MIB + 1)
    status, error, _ = await guard.explain(_json([big]))
    assert status == 413
    assert error["message"].startswith("request body: ")
    assert (
        "over the server's limit of 1048576 bytes (1 MiB, server.max_message_mb)"
        in (error["message"])
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(8):
            yield b" " * (MIB // 4)

    status, error, _ = await guard.explain(chunks())
    assert status == 413

    form = aiohttp.FormData()
    for _ in range(3):
        form.add_field("image", SMALL, filename="small.png", content_type="image/png")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with guard.http.post(
        guard.url("/v1/models/gated:explain"), data=form, headers=headers, ssl=guard.trust
    ) as reply:
        assert reply.status == 400
        assert "more than the limit of 2 per request" in (await reply.json())["message"]


async def test_a_full_queue_is_429_with_retry_after_and_a_deadline_504(
    guard: Guarded, gate: None
) -> None:
    blocked = asyncio.create_task(guard.explain(_json([SMALL])))
    assert await asyncio.to_thread(gated_model.ENTERED.wait, 10)
    queued = asyncio.create_task(guard.explain(_json([SMALL, SMALL])))  # fills the queue of 2
    await asyncio.to_thread(
        wait_until, lambda: guard.server.server.registry.get("gated").queue_depth == 2
    )

    status, error, headers = await guard.explain(_json([SMALL]))
    assert (status, error["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert "model 'gated' is overloaded" in error["message"]
    assert error["retry_after_s"] > 0
    assert int(headers["Retry-After"]) >= 1
    gated_model.GATE.set()
    results = await asyncio.gather(blocked, queued)
    assert [r[0] for r in results] == [200, 200]  # every admitted request is answered

    gated_model.ENTERED.clear()
    gated_model.GATE.clear()
    blocked = asyncio.create_task(guard.explain(_json([SMALL])))
    assert await asyncio.to_thread(gated_model.ENTERED.wait, 10)
    status, error, _ = await guard.explain(_json([SMALL]), **{"X-Timeout-S": "0.3"})
    assert (status, error["status"]) == (504, "DEADLINE_EXCEEDED")
    assert error["message"] == (
        "deadline passed: the request was not answered within X-Timeout-S=0.3 s; allow more "
        "time or send fewer concurrent requests"
    )
    assert guard.server.server.registry.get("gated").queue_depth == 0  # its room is free
    status, error, _ = await guard.explain(_json([SMALL]), **{"X-Timeout-S": "soon"})
    assert status == 400
    assert "X-Timeout-S='soon'" in error["message"]
    gated_model.GATE.set()
    assert (await blocked)[0] == 200


async def test_a_draining_server_answers_503(guard: Guarded) -> None:
    """Last in the module: the guarded server starts no new work afterwards."""
    guard.server.server.servicer.begin_drain()
    status, error, _ = await guard.explain(_json([SMALL]))
    assert (status, error["status"]) == (503, "UNAVAILABLE")
    assert "server is shutting down" in error["message"]
    async with guard.http.get(guard.url("/v1/health"), ssl=guard.trust) as reply:
        assert reply.status == 200  # health turns NOT_SERVING when stop() begins, not here
