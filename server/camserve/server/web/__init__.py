"""The HTTP/JSON API and the web page, served beside gRPC on `server.http_port`.

Requests are turned into camserve.v1 messages (protobuf's JSON mapping, or a multipart upload)
and answered through the same servicer entry the RPCs use, so both protocols share one pipeline,
one set of limits and one set of messages.
"""
