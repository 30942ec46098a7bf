"""gRPC status mapping shared by both front doors: engine errors carry their code by name, an
unexpected exception becomes INTERNAL with a log line, and no stack trace reaches a client."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from rnnserve.doors.status import abort
from rnnserve.errors import ServingError, Unavailable
from rnnserve.ops.logs import Throttled

log = Throttled(__name__)


def internal_error(method: str) -> ServingError:
    """An unexpected failure: logged with its trace here (once a minute per method and error
    type), reported to the client without it."""
    kind = type(sys.exc_info()[1]).__name__
    log.error(f"{method}:{kind}", "unexpected error in %s", method, exc_info=True)
    return ServingError("internal error; the server log has the details")


def unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Track metrics for a unary RPC and map engine errors to gRPC status codes."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        tracing = self.metrics.tracing
        caller = tracing.incoming(context.invocation_metadata()) if tracing.on else None
        try:
            client = self.identities.client(context.invocation_metadata())
            with self.metrics.track(method.__name__, client) as call:
                return await method(self, request, call)
        except ServingError as exc:
            await abort(context, exc)
        except Exception:
            await abort(context, internal_error(method.__name__))
        finally:
            if caller is not None:
                tracing.leave(caller)

    return handler


async def abort_unless_open(
    check_open: Callable[[], None], context: grpc.aio.ServicerContext
) -> None:
    """End a stream with UNAVAILABLE once the server drains, so its client reconnects."""
    try:
        check_open()
    except Unavailable as exc:
        await abort(context, exc)


async def stream_replies(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
    engine: Any,
    identities: Any,
    streams: Any,
    answer: Callable[[Any, str], Awaitable[Any]],
) -> AsyncIterator[Any]:
    """A bidirectional stream for both front doors: the caller's identity once, then one
    `answer(request, client)` per message. Once the server drains, the stream ends with
    UNAVAILABLE: at once if it was waiting for a message, after its current one otherwise.
    With tracing on, each message's span is a child of the stream's caller's trace."""
    try:
        client = identities.client(context.invocation_metadata())
    except ServingError as exc:
        await abort(context, exc)
    tracing = engine.metrics.tracing
    caller = tracing.incoming(context.invocation_metadata()) if tracing.on else None
    try:
        async for request in streams.requests(requests):
            await abort_unless_open(engine.check_open, context)
            yield await answer(request, client)
    except asyncio.CancelledError:
        if not engine.draining:
            raise
    finally:
        if caller is not None:
            tracing.leave(caller)
    await abort_unless_open(engine.check_open, context)
