"""The front doors: gRPC servicers that translate the wire (rnnserve.v1, KServe v2) into engine
calls and the engine's answers back, and what guards them (auth, admission, read slots, the
mapping of errors to statuses). They may import the engine, models, state, ops and errors;
nothing below them imports them."""
