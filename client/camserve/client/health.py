"""The messages of the standard `grpc.health.v1.Health/Check` call, declared by the client.

grpcio-health-checking is a server extra, so the client declares the two one-field messages
(HealthCheckRequest{string service = 1}, HealthCheckResponse{ServingStatus status = 1}) itself, in
a private descriptor pool. One code path whether or not the extra is installed, and no clash with
`grpc_health.v1.health_pb2` when both are imported (a private pool shares no names).
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = "SERVING"


@functools.cache
def _messages() -> tuple[Any, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="camserve_client/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = proto.message_type.add(name="HealthCheckResponse")
    # The status enum is read as a plain int32: identical on the wire, and no enum to declare.
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
        ),
    )


def encode_request(service: str = "") -> bytes:
    request_class, _ = _messages()
    return bytes(request_class(service=service).SerializeToString())


def decode_status(data: bytes) -> str:
    """The serving status name in a HealthCheckResponse."""
    _, response_class = _messages()
    status = int(response_class.FromString(data).status)
    return STATUS_NAMES.get(status, f"UNKNOWN({status})")
