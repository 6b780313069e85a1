"""The committed gRPC stubs are exactly what grpcio-tools generates from the .proto file."""

from __future__ import annotations

from pathlib import Path

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


def test_every_wire_method_has_a_name_and_the_engine_knows_it() -> None:
    from camserve.server.engine import ALL_METHODS
    from camserve.v1 import explain_pb2 as pb
    from camserve.v1.methods import ALL_METHOD_BY_NAME, METHOD_BY_NAME

    named = {value for value in pb.Method.values() if value != pb.METHOD_UNSPECIFIED}
    assert set(ALL_METHOD_BY_NAME.values()) == named
    assert tuple(ALL_METHOD_BY_NAME) == ALL_METHODS
    assert METHOD_BY_NAME.items() <= ALL_METHOD_BY_NAME.items()
