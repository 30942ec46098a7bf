"""Errors on the wire as google.rpc.Status, one form everywhere: a failed call's trailers
(through grpcio-status), a failed stream message and a failed row of a step.

A RetryInfo detail says when retrying the same call can succeed (a full memory budget, a drain,
a version still loading), so clients back off by the server's word instead of guessing.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rnnserve.errors import ServingError

CODES = {code.name: code for code in grpc.StatusCode}
BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def to_status(error: ServingError) -> status_pb2.Status:
    return row_status(error.code, str(error), error.retry_after)


def _retry_info(seconds: float) -> any_pb2.Any:
    detail = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return detail


def row_status(code: str, message: str, retry_after: float | None = None) -> status_pb2.Status:
    """A failed row's status, with the RetryInfo a whole call's error would carry."""
    return fill_status(status_pb2.Status(), code, message, retry_after)


def fill_status(
    status: status_pb2.Status, code: str, message: str, retry_after: float | None = None
) -> status_pb2.Status:
    """`row_status` written into a message in place: a step's rows fill the statuses in its
    response, half the cost of building each and copying it in."""
    status.code = CODES[code].value[0]
    status.message = message
    if retry_after is not None:
        status.details.append(_retry_info(retry_after))
    return status


def retry_after(status: status_pb2.Status) -> float | None:
    """The RetryInfo delay in seconds, if the status carries one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def abort(context: grpc.aio.ServicerContext, error: ServingError) -> None:
    """End the call with the error's status, its google.rpc.Status in the trailers."""
    status = rpc_status.to_status(to_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def from_rpc_error(exc: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carries (plain code and details when it has none,
    e.g. errors raised by gRPC itself)."""
    status = rpc_status.from_call(exc)
    if status is None:
        return status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")
    return status
