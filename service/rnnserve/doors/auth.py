"""Bearer-token check on every call except the health service (probes carry no secrets).

Which client a valid token belongs to is rnnserve.doors.identity's business; the servicers ask it
again for the name, as interceptors cannot hand values to handlers.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from rnnserve.doors.identity import Identities
from rnnserve.errors import Unauthenticated

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler that ends every call with `code` before reading its request: served as a
    stream-request handler (the same on the wire), as grpc reads a unary request before the
    handler runs, and a refused caller could then make the server receive a whole message."""

    async def abort(request, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    async def abort_stream(request, context: grpc.aio.ServicerContext):
        await abort(request, context)
        yield  # pragma: no cover - abort raised before this line

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            abort_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_unary_rpc_method_handler(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, identities: Identities) -> None:
        self.identities = identities

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self.identities.client(details.invocation_metadata)
        except Unauthenticated:
            return refusing(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
            )
        return handler


class SharedKeyInterceptor(grpc.aio.ServerInterceptor):
    """Calls must carry `key` in metadata `header`: the workers' unix sockets answer only
    their siblings, not any process that can reach the socket."""

    def __init__(self, header: str, key: str) -> None:
        self.header = header
        self.key = key.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        given = dict(details.invocation_metadata or ()).get(self.header, "")
        if handler is None or hmac.compare_digest(
            given.encode() if isinstance(given, str) else given, self.key
        ):
            return handler
        return refusing(
            handler,
            grpc.StatusCode.PERMISSION_DENIED,
            "this socket answers only the other workers of its server",
        )
