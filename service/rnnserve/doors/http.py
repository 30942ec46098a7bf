"""The KServe v2 HTTP/REST front door (the Open Inference Protocol over HTTP/1.1, with Triton's
binary tensor data extension and sequence parameters), served by aiohttp on the server's own
event loop: JSON in, the data plane (kserve_dataplane), JSON out.

It is the gRPC doors' twin in everything but the wire: the same data plane and engine (a
sequence started over gRPC continues over HTTP: both derive its session from the client, the
model and the sequence id), the same bearer tokens (an `Authorization: Bearer` header), the same
--max-concurrent-rpcs count and read slots as the gRPC calls (admission.py), the same metrics
(methods named `http/<Method>`), and the same error codes, as HTTP statuses with KServe's
`{"error": "..."}` body. Health is open, as over gRPC.

aiohttp was measured against uvicorn under Starlette (bench/http_servers.py): the figures are in
docs/http.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rnnserve.doors.admission import Admission
from rnnserve.doors.identity import Identities
from rnnserve.doors.kserve_dataplane import DataPlane
from rnnserve.doors.kserve_json import (
    HEADER_LENGTH,
    NAME_CHARS,
    config_json,
    index_request,
    infer_request,
    infer_response,
    metadata_json,
)
from rnnserve.doors.rpc_errors import internal_error
from rnnserve.errors import DeadlineExceeded, ResourceExhausted, ServingError
from rnnserve.ops.metrics import Call, Metrics

log = logging.getLogger(__name__)
STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""Each error code's HTTP status; the code itself is in the body's error text."""
JSON = "application/json"
BINARY = "application/octet-stream"
MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


class BodyTooLarge(ResourceExhausted):
    """A body over --max-message-bytes: 413, as HTTP says of a body that will never fit."""

    http_status = 413


def error_response(error: ServingError) -> web.Response:
    """KServe's error body; Retry-After when the same call may succeed later."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    status = getattr(error, "http_status", None) or STATUS.get(error.code, 500)
    return web.json_response({"error": f"{error.code}: {error}"}, status=status, headers=headers)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, another method) in KServe's error body too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            {
                "error": f"{exc.reason}: {request.method} {request.path[:NAME_CHARS]} is not an "
                "endpoint of KServe v2 over HTTP (see /v2 and docs/http.md)"
            },
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k == "Allow"},
        )


class HttpDoor:
    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        identities: Identities,
        admission: Admission,
        max_body: int,
        grace: float,
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.identities = identities
        self.admission = admission
        self.max_body = max_body
        self.grace = grace
        """Seconds calls in flight get to finish once `stop` begins (--shutdown-grace)."""
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[_json_errors])
        add = app.router.add_route
        add("GET", "/v2/health/live", self._open("ServerLive", self._live))
        add("GET", "/v2/health/ready", self._open("ServerReady", self._ready))
        add("GET", "/v2", self._counted("ServerMetadata", self._server_metadata))
        add("POST", "/v2/repository/index", self._counted("RepositoryIndex", self._index))
        for path in (MODEL, VERSION):
            add("GET", path, self._counted("ModelMetadata", self._model_metadata))
            add("GET", f"{path}/ready", self._counted("ModelReady", self._model_ready))
            add("GET", f"{path}/config", self._counted("ModelConfig", self._model_config))
            add("POST", f"{path}/infer", self._counted("ModelInfer", self._infer))
        return app

    async def start(self, host: str, port: int, shared: bool, tls: ssl.SSLContext | None) -> int:
        """Listen; `shared` joins the port its supervisor holds for the workers (SO_REUSEPORT).
        Returns the port (a concrete one for 0)."""
        self._runner = web.AppRunner(
            self.application(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.grace,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=shared or None, ssl_context=tls)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """No new connections; calls in flight get the grace period to finish."""
        if self._runner is not None:
            await self._runner.cleanup()

    def _open(self, method: str, handler: Handler) -> Callable[..., Awaitable[Any]]:
        """Health: no token, not counted against --max-concurrent-rpcs."""
        return self._call(f"http/{method}", handler, counted=False)

    def _counted(self, method: str, handler: Handler) -> Callable[..., Awaitable[Any]]:
        return self._call(f"http/{method}", handler, counted=True)

    def _call(
        self, method: str, handler: Handler, counted: bool
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            entered = False
            tracing = self.metrics.tracing
            caller = tracing.incoming(request.headers.items()) if tracing.on else None
            try:
                client = (
                    self.identities.client(
                        [("authorization", request.headers.get("Authorization", ""))]
                    )
                    if counted
                    else ""
                )
                if counted:
                    self.admission.enter()
                    entered = True
                with self.metrics.track(method, client) as call:
                    return await handler(request, call)
            except ServingError as exc:
                return error_response(exc)
            except Exception:
                return error_response(internal_error(method))
            finally:
                if entered:
                    self.admission.leave()
                if caller is not None:
                    tracing.leave(caller)

        return handle

    async def _body(self, request: web.Request, call: Call) -> bytes:
        """The body, read while the call holds a read slot and within --read-timeout, as a
        gRPC call's message is; over --max-message-bytes is 413."""
        reads = self.admission.reads
        reader = call.client if self.identities.enabled else str(request.remote)
        if not reads.take_now(reader):
            await reads.take(reader)
        try:
            async with asyncio.timeout(self.admission.read_timeout):
                return await request.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request body did not arrive within {self.admission.read_timeout:g} s "
                "(--read-timeout)"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(
                f"the body is over --max-message-bytes ({self.max_body:,} bytes): send "
                "tensors as binary data (a third of JSON's size), or fewer rows per call"
            ) from None
        finally:
            reads.give_back(reader)

    async def _live(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response({"live": self.plane.server_live()})

    async def _ready(self, request: web.Request, call: Call) -> web.Response:
        ready = self.plane.server_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, request: web.Request, call: Call) -> web.Response:
        server = self.plane.server_metadata()
        return web.json_response(
            {"name": server.name, "version": server.version, "extensions": server.extensions}
        )

    async def _index(self, request: web.Request, call: Call) -> web.Response:
        ready_only = index_request(await self._body(request, call))
        return web.json_response(
            [
                {"name": m.name, "version": m.version, "state": m.state}
                for m in self.plane.repository_index(ready_only)
            ]
        )

    @staticmethod
    def _name(request: web.Request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    async def _model_metadata(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response(
            metadata_json(self.plane.model_metadata(*self._name(request), call))
        )

    async def _model_ready(self, request: web.Request, call: Call) -> web.Response:
        name, version = self._name(request)
        ready = self.plane.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def _model_config(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response(config_json(self.plane.model_config(*self._name(request), call)))

    async def _infer(self, request: web.Request, call: Call) -> web.Response:
        name, version = self._name(request)
        model = self.plane.model(name, version, call)
        body = await self._body(request, call)
        parsed, binary = infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
        answer = await self.plane.infer(model, parsed, call)
        data, json_length = infer_response(answer, binary)
        if json_length is None:
            return web.Response(body=data, content_type=JSON)
        return web.Response(
            body=data, content_type=BINARY, headers={HEADER_LENGTH: str(json_length)}
        )
