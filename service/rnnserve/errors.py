"""Engine errors, each carrying the gRPC status code (by name) the transport reports for it.

The engine stays importable without grpc; the servicers map `code` to grpc.StatusCode in one place.
"""

from __future__ import annotations


class ServingError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds after which the same call may succeed (google.rpc.RetryInfo); None: do not
        retry unchanged."""


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class AlreadyExists(ServingError):
    code = "ALREADY_EXISTS"


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"
