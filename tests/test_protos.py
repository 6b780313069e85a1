"""The committed gRPC stubs are exactly what grpcio-tools generates from the .proto file."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent.parent / "protos"
GENERATED = ("explain_pb2.py", "explain_pb2_grpc.py", "explain_pb2.pyi")


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(PROTOS / "camserve" / "v1" / "explain.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "camserve" / "v1" / name).read_text()
        committed = (PROTOS / "camserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos` and commit the result"


def test_every_wire_method_has_a_name_and_the_engine_registry_agrees() -> None:
    from camserve.server.engine import REGISTRY
    from camserve.v1 import explain_pb2 as pb
    from camserve.v1.methods import METHOD_BY_NAME, NAME_BY_METHOD

    named = {value for value in pb.Method.values() if value != pb.METHOD_UNSPECIFIED}
    assert set(METHOD_BY_NAME.values()) == named
    # The registry states each method's wire value; the protocol's table says the same, in order.
    assert [(m.name, m.wire) for m in REGISTRY] == list(METHOD_BY_NAME.items())
    assert NAME_BY_METHOD[pb.METHOD_UNSPECIFIED] == "gradcam"
    assert all(NAME_BY_METHOD[value] == name for name, value in METHOD_BY_NAME.items())


def test_every_wire_score_has_the_engine_name_and_defaults() -> None:
    from camserve.server.engine import faithfulness
    from camserve.server.engine.types import EngineError
    from camserve.server.settings import LimitsSettings
    from camserve.v1 import explain_pb2 as pb
    from camserve.v1 import scores

    named = {value for value in pb.Score.values() if value != pb.SCORE_UNSPECIFIED}
    assert set(scores.SCORE_BY_NAME.values()) == named
    assert tuple(scores.SCORE_BY_NAME) == faithfulness.SCORES
    assert scores.CURVE_SCORES == faithfulness.CURVE_SCORES
    assert set(scores.HIGHER_IS_BETTER) == set(faithfulness.SCORES)
    assert scores.DEFAULT_SCORE_STEPS == faithfulness.DEFAULT_STEPS
    assert LimitsSettings().max_score_steps == faithfulness.MAX_STEPS
    assert faithfulness.check_steps(scores.MIN_SCORE_STEPS) == scores.MIN_SCORE_STEPS
    with pytest.raises(EngineError):
        faithfulness.check_steps(scores.MIN_SCORE_STEPS - 1)
