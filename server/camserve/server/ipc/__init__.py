"""What crosses between the frontend processes and the engine process: shared-memory rings for
tensor bytes, a pickle codec that puts every tensor into a ring, and length-prefixed frames."""
