"""Undecodable request bytes become INVALID_ARGUMENT, counted and logged at most once a minute.

gRPC parses a request before any servicer code runs; a parse failure there reaches the client as
UNKNOWN with protobuf's class names, writes a traceback per request to the log and passes by the
metrics. Every method handler is therefore registered through `TolerantServer`, which gives it a
deserializer that returns an `Undecodable` marker instead of raising, and a behaviour that answers
the marker with INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from rnnserve.ops.logs import Throttled
from rnnserve.ops.metrics import Metrics

log = Throttled(__name__)


class Undecodable:
    """What a request that could not be parsed becomes."""

    __slots__ = ("message_type",)

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


class _UndecodableInStream(Exception):
    pass


def _message(method: str, marker: Undecodable) -> str:
    return (
        f"the request to {method} is not a valid {marker.message_type} message; "
        "check that client and server use the same .proto"
    )


def _deserializer(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None
    owner = getattr(parse, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "protobuf")

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
            return Undecodable(name)

    return tolerant


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise _UndecodableInStream(request)
        yield request


class _Refuser:
    """Counts and logs one undecodable request and aborts it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def refuse(
        self, method: str, marker: Undecodable, context: grpc.aio.ServicerContext
    ) -> None:
        name = method.rsplit("/", 1)[-1]
        count, _ = self.metrics.children("", "", name, "INVALID_ARGUMENT")
        count.inc()
        log.warning(
            f"undecodable:{method}", "undecodable %s request (%s)", method, marker.message_type
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, marker))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        refuse = functools.partial(self.refuse, method)
        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            async def stream_stream(requests, context):
                try:
                    async for response in inner(_checked(requests), context):
                        yield response
                except _UndecodableInStream as exc:
                    await refuse(exc.args[0], context)

            async def stream_stream_writing(requests, context):  # handlers on context.write
                try:
                    await inner(_checked(requests), context)
                except _UndecodableInStream as exc:
                    await refuse(exc.args[0], context)

            if not inspect.isasyncgenfunction(inner):
                stream_stream = stream_stream_writing
            return handler._replace(
                request_deserializer=_deserializer(handler.request_deserializer),
                stream_stream=stream_stream,
            )
        if handler.request_streaming:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                try:
                    return await inner(_checked(requests), context)
                except _UndecodableInStream as exc:
                    await refuse(exc.args[0], context)

            return handler._replace(
                request_deserializer=_deserializer(handler.request_deserializer),
                stream_unary=stream_unary,
            )
        if handler.response_streaming:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                async for response in inner(request, context):
                    yield response

            async def unary_stream_writing(request, context):  # handlers on context.write
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                await inner(request, context)

            if not inspect.isasyncgenfunction(inner):
                unary_stream = unary_stream_writing

            return handler._replace(
                request_deserializer=_deserializer(handler.request_deserializer),
                unary_stream=unary_stream,
            )
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, Undecodable):
                await refuse(request, context)
            return await inner(request, context)

        return handler._replace(
            request_deserializer=_deserializer(handler.request_deserializer),
            unary_unary=unary_unary,
        )


class _TolerantGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, refuser: _Refuser) -> None:
        self.inner = inner
        self.refuser = refuser
        self.cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        wrapped = self.cache.get(details.method)
        if wrapped is None:
            handler = self.inner.service(details)
            if handler is None:
                return None
            wrapped = self.cache[details.method] = self.refuser.wrap(handler, details.method)
        return wrapped


class TolerantServer:
    """Stands in for a grpc.aio.Server where generated `add_*_to_server` functions register
    their handlers; everything else goes to the real server."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics) -> None:
        self._server = server
        self._refuser = _Refuser(metrics)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_TolerantGeneric(h, self._refuser) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service,
            {name: self._refuser.wrap(h, f"/{service}/{name}") for name, h in handlers.items()},
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


grpc.aio.Server.register(TolerantServer)  # so helpers that check for an aio server pick theirs
