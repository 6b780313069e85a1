"""The HTTP API's JSON answers: tensor bytes spliced in are exactly what json_format writes."""

from __future__ import annotations

import json

import numpy as np
from google.protobuf import json_format

from camserve.server.web.encoding import response_json, to_json
from camserve.v1 import explain_pb2 as pb
from camserve.v1.tensors import to_proto


def _response() -> pb.ExplainResponse:
    rng = np.random.default_rng(0)
    response = pb.ExplainResponse(request_id='a "quoted" id', model="m", batch_size=2)
    for image in range(2):
        result = response.results.add(overlay_png=b"\x89PNG" * image)
        result.predictions.add(index=3, label="caf\u00e9 \\ tensor-", probability=0.5)
        for method in (pb.METHOD_GRADCAM, pb.METHOD_LAYERCAM):
            heatmap = result.heatmaps.add(method=method, class_index=3, layer="head")
            heatmap.data.CopyFrom(to_proto(rng.random((7, 5), dtype=np.float32)))
            heatmap.deletion_auc = 0.25
            heatmap.deletion_curve.extend([1.0, 0.5, 0.0])
    empty = response.results[1].heatmaps.add(method=pb.METHOD_EIGENCAM)
    empty.data.shape.extend([0, 0])  # a tensor without bytes keeps its mapping too
    return response


def test_spliced_json_is_byte_for_byte_what_json_format_writes() -> None:
    original = _response()
    expected = to_json(original)
    copy = pb.ExplainResponse()
    copy.CopyFrom(original)
    assert response_json(copy) == expected
    assert json_format.ParseDict(json.loads(expected), pb.ExplainResponse()) == original


def test_an_answer_without_heatmaps_converts_too() -> None:
    response = pb.ExplainResponse(request_id="r", error=pb.Error(code=8, message="busy"))
    assert response_json(response) == to_json(response)
