"""Admission: which calls the server takes, and when it reads their request messages.

--max-concurrent-rpcs counts application calls only. grpc's own `maximum_concurrent_rpcs`
counts every call alike, so 21 connections of header-only streams (2,048 slots, +52 MiB) refused
196 of 200 health checks: a liveness probe would then restart a server that was only full. A
call past the cap ends at once with RESOURCE_EXHAUSTED and a RetryInfo, as every other full
resource does.

grpc reads a unary call's request before any handler runs, so a refusal there would come after
the message had been received in full. Every unary-request method is therefore served as a
stream-request one (the same on the wire): the call is admitted first, and its message is then
read while the call holds a read slot (read_slots.py) and within a timeout. A refused or
unauthenticated call never has its message read: it holds at most the 64 KiB stream window.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rnnserve.doors.identity import Identities
from rnnserve.doors.read_slots import EvictingSlots, ReadSlots
from rnnserve.doors.status import abort
from rnnserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServingError
from rnnserve.ops.config import ServerConfig

RETRY_AFTER = 1.0
"""Seconds a refused caller is told to wait: calls end within about that at the usual load."""
OPEN_READ_SLOTS = 8
"""Health-check messages read at once: each stands for one --max-message-bytes of memory."""
OPEN_READ_TIMEOUT = 1.0


def read_slots(config: ServerConfig) -> ReadSlots:
    """--read-budget in messages of --max-message-bytes, at least one; half for one client."""
    slots = max(1, config.read_budget // config.max_message_bytes)
    return ReadSlots(slots, max(1, slots // 2))


def reader(identities: Identities) -> Callable[[grpc.aio.ServicerContext], str]:
    """Whose a read is: the client's name where tokens name clients, else the connection (an
    anonymous server cannot tell its clients apart any better)."""

    def client(context: grpc.aio.ServicerContext) -> str:
        if identities.enabled:  # a reloaded tokens file may turn auth on or off
            return identities.client(context.invocation_metadata())
        return context.peer()

    return client


class Admission(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        capacity: int,
        exempt: tuple[str, ...],
        reads: ReadSlots,
        read_timeout: float,
        client: Callable[[grpc.aio.ServicerContext], str],
    ) -> None:
        self.capacity = capacity
        self.exempt = exempt
        """Method path prefixes never counted nor refused (health, reflection)."""
        self.reads = reads
        self.read_timeout = read_timeout
        self.client = client
        """Whose read a call's is: its client's name with auth on, else its connection."""
        self.open_reads = EvictingSlots(OPEN_READ_SLOTS)
        self.open = 0
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        known = self._wrapped.get(id(handler))
        if known is None or known[0] is not handler:  # handlers are made once per method
            exempt = details.method.startswith(self.exempt)
            if exempt and handler.request_streaming:
                return handler
            wrapped = self._wrap(
                handler, counted=not exempt, read=self._read_open if exempt else self._read
            )
            known = self._wrapped[id(handler)] = (handler, wrapped)
        return known[1]

    def enter(self) -> None:
        """Count one more call open, or refuse it: the HTTP door's calls count here too."""
        if self.open >= self.capacity:
            raise ResourceExhausted(
                f"the server has {self.capacity} calls open, its limit "
                "(--max-concurrent-rpcs); retry, or spread calls over more replicas",
                retry_after=RETRY_AFTER,
            )
        self.open += 1

    def leave(self) -> None:
        self.open -= 1

    async def _read(self, context: grpc.aio.ServicerContext) -> Any:
        client = self.client(context)
        if not self.reads.take_now(client):
            await self.reads.take(client)
        try:
            async with asyncio.timeout(self.read_timeout):
                request = await context.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {self.read_timeout:g} s of the "
                "server asking for it (--read-timeout); send each message whole"
            ) from None
        finally:
            self.reads.give_back(client)
        return _present(request)

    async def _read_open(self, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(OPEN_READ_TIMEOUT) as read:
                self.open_reads.take(read)
                try:
                    request = await context.read()
                finally:
                    self.open_reads.give_back(read)
        except TimeoutError:
            raise DeadlineExceeded("the health check's message did not arrive in time") from None
        return _present(request)

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler,
        counted: bool,
        read: Callable[[grpc.aio.ServicerContext], Awaitable[Any]],
    ) -> grpc.RpcMethodHandler:
        """The handler, counted from start to end when `counted`, with a unary request read by
        `read` after admission; the same four kinds of behaviour, async generators where the
        behaviour is one."""
        kind = {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[(handler.request_streaming, handler.response_streaming)]
        inner = getattr(handler, kind)
        unary_request = not handler.request_streaming
        admission = self

        async def start(request: Any, context: grpc.aio.ServicerContext) -> Any:
            """Admit the call and give the behaviour's request: read here for a unary one."""
            try:
                if counted:
                    admission.enter()
                try:
                    return await read(context) if unary_request else request
                except BaseException:
                    if counted:
                        admission.leave()
                    raise
            except ServingError as error:
                await abort(context, error)

        def leave() -> None:
            if counted:
                admission.leave()

        if inspect.isasyncgenfunction(inner):

            async def generating(request, context):
                request = await start(request, context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    leave()

            behaviour: Callable[..., Any] = generating
        else:

            async def returning(request, context):
                request = await start(request, context)
                try:
                    return await inner(request, context)
                finally:
                    leave()

            behaviour = returning
        streaming = "stream_stream" if handler.response_streaming else "stream_unary"
        return handler._replace(
            request_streaming=True,
            **{"unary_unary": None, "unary_stream": None, streaming: behaviour},
        )


def _present(request: Any) -> Any:
    """The request a read gave, or InvalidArgument when the call ended without one."""
    if request is grpc.aio.EOF:
        raise InvalidArgument("the call ended without its request message")
    return request
