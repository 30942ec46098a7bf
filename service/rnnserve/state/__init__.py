"""Session state: the session table and its locks, the host and device slot stores, the memory
budget, and the table of sessions the workers of one server share. May import models, ops and
errors."""
