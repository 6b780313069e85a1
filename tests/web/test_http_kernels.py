"""GetKernels over HTTP: `GET /v1/models/{model}/kernels`, JSON equal to the RPC's, the grid as a
PNG for an <img>, and refusals with the RPC's messages."""

from __future__ import annotations

import io
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from PIL import Image

from camserve.v1 import explain_pb2 as pb
from camserve.v1 import explain_pb2_grpc as pb_grpc
from tests._support.servers import http_url

pytestmark = pytest.mark.timeout(240)


async def test_kernels_json_equals_the_rpc(camserve_server: Any, http: Any) -> None:
    query = "?layer=layer1.0.conv1&page=1&tiles_per_page=512"
    async with http.get(http_url(camserve_server, "/v1/models/resnet18/kernels" + query)) as answer:
        assert answer.status == 200
        body = await answer.text()
    over_http = json_format.Parse(body, pb.GetKernelsResponse())
    request = pb.GetKernelsRequest(
        model="resnet18", layer="layer1.0.conv1", page=1, tiles_per_page=512
    )
    async with grpc.aio.insecure_channel(camserve_server.address) as channel:
        over_grpc = await pb_grpc.ExplainServiceStub(channel).GetKernels(request)
    assert over_http == over_grpc
    assert (over_http.page, over_http.pages, over_http.first_filter) == (1, 8, 8)


async def test_the_grid_comes_as_a_png(camserve_server: Any, http: Any) -> None:
    path = "/v1/models/efficientnet-lite0/kernels?format=png&tile_size=24"
    async with http.get(http_url(camserve_server, path)) as answer:
        assert answer.status == 200
        assert answer.content_type == "image/png"
        picture = Image.open(io.BytesIO(await answer.read()))
    assert picture.mode == "RGB"  # the first conv, in colour
    assert picture.size == (1 + 6 * 25, 1 + 6 * 25)  # 32 filters: 6 x 6, 3x3 kernels at 8 px


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v1/models/resnet18/kernels?layer=fc", 400, "'fc' is not a Conv2d"),
        ("/v1/models/resnet18/kernels?page=5", 400, "page=5"),
        ("/v1/models/resnet18/kernels?colour=1", 400, "query parameter 'colour'"),
        ("/v1/models/resnet18/kernels?page=-1", 400, "query parameters"),
        ("/v1/models/resnet18/kernels?format=svg", 400, "format='svg'"),
        ("/v1/models/alexnet/kernels", 404, "alexnet"),
    ],
)
async def test_bad_kernel_urls_are_refused_with_the_reason(
    camserve_server: Any, http: Any, path: str, status: int, message: str
) -> None:
    async with http.get(http_url(camserve_server, path)) as answer:
        assert answer.status == status
        body = await answer.json()
    assert message in body["message"]


async def test_openapi_describes_the_kernels_endpoint(camserve_server: Any, http: Any) -> None:
    async with http.get(http_url(camserve_server, "/openapi.json")) as answer:
        document = await answer.json()
    operation = document["paths"]["/v1/models/{model}/kernels"]["get"]
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert {"model", "layer", "page", "tiles_per_page", "tile_size", "format"} <= names
    assert "GetKernelsResponse" in document["components"]["schemas"]
