"""--max-concurrent-rpcs: how many calls may be open at once, with health and reflection apart.

grpc's own `maximum_concurrent_rpcs` counts every call alike, so 21 connections of header-only
streams (2,048 slots, +52 MiB) refused 196 of 200 health checks: a liveness probe would then
restart a server that was only full. Here the cap counts application calls only; a call past it
ends at once with RESOURCE_EXHAUSTED and a RetryInfo, as every other full resource does.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc

from rnnserve.errors import ResourceExhausted
from rnnserve.status import abort

RETRY_AFTER = 1.0
"""Seconds a refused caller is told to wait: calls end within about that at the usual load."""


class Admission(grpc.aio.ServerInterceptor):
    def __init__(self, capacity: int, exempt: tuple[str, ...]) -> None:
        self.capacity = capacity
        self.exempt = exempt
        """Method path prefixes never counted nor refused (health, reflection)."""
        self.open = 0
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt):
            return handler
        known = self._wrapped.get(id(handler))
        if known is None or known[0] is not handler:  # handlers are made once per method
            known = self._wrapped[id(handler)] = (handler, self._wrap(handler))
        return known[1]

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.open >= self.capacity:
            await abort(context, ResourceExhausted(
                f"the server has {self.capacity} calls open, its limit "
                "(--max-concurrent-rpcs); retry, or spread calls over more replicas",
                retry_after=RETRY_AFTER))
        self.open += 1

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with its behaviour counted from start to end, for each of the four
        kinds of call, as an async generator where the behaviour is one."""
        kind = {(False, False): "unary_unary", (False, True): "unary_stream",
                (True, False): "stream_unary", (True, True): "stream_stream"}[
            (handler.request_streaming, handler.response_streaming)]
        inner = getattr(handler, kind)

        if inspect.isasyncgenfunction(inner):
            async def counted_stream(request, context):
                await self._enter(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    self.open -= 1

            return handler._replace(**{kind: counted_stream})

        async def counted(request, context):
            await self._enter(context)
            try:
                return await inner(request, context)
            finally:
                self.open -= 1

        return handler._replace(**{kind: counted})
