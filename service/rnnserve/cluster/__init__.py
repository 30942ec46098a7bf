"""Sessions across processes: the sibling workers of one server (gRPC over unix sockets) and
replicas sharing Redis. They implement the engine's session sources (rnnserve.engine.sources)
and may import the engine, state, models, ops and errors."""
