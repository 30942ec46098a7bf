"""The engine: models as served (registry), Predict planning, the session lifecycle and steps,
batching runs onto ONNX Runtime. Plain Python and numpy, never gRPC, so it is tested without a
server: it may import state, models, ops and errors. The places sessions come from when they are
not live here (sibling workers, the shared store) reach it through the protocols in sources.py,
implemented in rnnserve.cluster."""
