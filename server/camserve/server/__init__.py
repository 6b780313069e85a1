"""camserve's server: model registry, dynamic batching, the CAM engine and the gRPC service."""
