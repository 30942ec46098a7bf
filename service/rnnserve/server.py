"""Builds the gRPC server around the engine and runs it until SIGTERM/SIGINT, then drains."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from rnnserve.cluster.siblings import SIBLING_KEY_HEADER, Siblings, SiblingsServicer, socket_path
from rnnserve.cluster.stores import open_store
from rnnserve.doors.admission import Admission, read_slots, reader
from rnnserve.doors.auth import OPEN_PREFIXES, BearerTokenInterceptor, SharedKeyInterceptor
from rnnserve.doors.decoding import TolerantServer
from rnnserve.doors.http import HttpDoor
from rnnserve.doors.identity import Identities
from rnnserve.doors.kserve import KServeServicer
from rnnserve.doors.kserve_dataplane import DataPlane
from rnnserve.doors.native import InferenceServicer
from rnnserve.doors.streams import OpenStreams
from rnnserve.engine.engine import Engine
from rnnserve.engine.registry import ModelRegistry
from rnnserve.engine.sources import StoreUnavailable
from rnnserve.generated.inference import grpc_service_pb2_grpc
from rnnserve.generated.rnnserve.internal.v1 import siblings_pb2_grpc
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc
from rnnserve.models.contract import ModelSpec
from rnnserve.models.runner import OrtRunner, providers_for
from rnnserve.models.runtime import Runner
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.metrics import Metrics
from rnnserve.ops.ports import PortUnavailable, can_listen, start_metrics
from rnnserve.ops.tracing import SERVICE_NAME, Tracing
from rnnserve.state.claims import Claims
from rnnserve.state.memory import MemoryBudget, return_freed_memory
from rnnserve.state.sessions import SessionTable
from rnnserve.supervisor import WorkerPlace

log = logging.getLogger(__name__)
SERVICE_NAMES = (rnnserve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,)
EVICTION_PERIOD_MAX = 1.0
TOKENS_POLL = 2.0
"""Seconds between looks at --auth-tokens-file (one stat)."""
OPEN_METHODS = (*OPEN_PREFIXES, f"/{reflection.SERVICE_NAME}/")
"""Paths that --max-concurrent-rpcs never counts: probes and tools must get through a full
server."""
LIVENESS = "liveness"
"""The health entry a liveness probe asks for: SERVING from the start while the event loop
answers, whatever the models do (a probe on "" would restart a server whose only model is
reloading, which loses every session and fixes nothing); NOT_SERVING once a drain began."""
STREAM_WINDOW = 64 * 1024


@dataclass
class Server:
    """A started server: what tests and `serve` need to reach and to stop."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    metrics_http: WSGIServer | None
    engine: Engine
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    tasks: list[asyncio.Task]
    streams: OpenStreams
    internal: grpc.aio.Server | None = None
    """A worker's unix-socket server for its siblings' session lookups."""
    http: HttpDoor | None = None
    """The KServe v2 HTTP/REST door, with --http-port."""
    http_port: int | None = None
    stopping: bool = False

    synced: bool = False
    """The first repository scan is done (until then the server is not ready)."""
    health_names: dict[str, int] = field(default_factory=dict)
    """The status each model name's health entry was last set to."""

    def background(self, work: Coroutine[Any, Any, None], what: str, lasting: bool = True) -> None:
        """Run `work` beside the server, tracked so that stop() cancels it. Its failure is
        logged, and so is the end of `lasting` work (it should run until stop: an idle sweep
        or a release listener that ended silently would leave the server unswept or deaf);
        one-off work leaves the list when done, so repeated SIGHUPs do not grow it."""
        if self.stopping:  # stop() has cancelled the others: this would outlive them
            work.close()
            return
        task = asyncio.create_task(work, name=what)
        self.tasks.append(task)
        task.add_done_callback(lambda done: self._ended(done, what, lasting))

    def _ended(self, task: asyncio.Task, what: str, lasting: bool) -> None:
        if not lasting and task in self.tasks:
            self.tasks.remove(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("%s failed and stopped: %s", what, error, exc_info=error)
        elif lasting and not self.stopping:
            log.error("%s ended while the server serves", what)

    async def set_serving(self) -> None:
        """Health per model follows the registry: NOT_SERVING while its only versions load,
        SERVING while a version of it serves, SERVICE_UNKNOWN once its last version is gone
        (after a drain began, nothing changes: every entry is NOT_SERVING)."""
        if self.engine.draining:
            return
        status = health_pb2.HealthCheckResponse
        models = self.engine.models()
        ready = {m.spec.name for m in models if m.ready}
        wanted = {
            m.spec.name: status.SERVING if m.spec.name in ready else status.NOT_SERVING
            for m in models
            if m.spec.name != LIVENESS
        }  # a model so named: no entry
        whole = self.synced and self.engine.ready
        await self.health.set("", status.SERVING if whole else status.NOT_SERVING)
        for name, serving in wanted.items():
            if self.health_names.get(name) != serving:
                await self.health.set(name, serving)
        for name in self.health_names.keys() - wanted.keys():
            await self.health.set(name, status.SERVICE_UNKNOWN)
        self.health_names = wanted

    async def sync_models(self) -> None:
        """Scan the repository; health follows each load as it happens, and the server as a
        whole turns SERVING once the first scan's loads are done."""
        await self.engine.sync_models(self.set_serving)
        self.synced = True
        await self.set_serving()

    async def stop(self) -> int:
        """Drain: health NOT_SERVING, new work UNAVAILABLE, idle streams end at once, in-flight
        work gets the grace period, sessions go to the shared store if there is one. Returns
        how many sessions were lost because that handoff failed (0 on a second call)."""
        if self.stopping:
            return 0
        self.stopping = True
        # One deadline for the handoff and the in-flight work together, so the whole drain
        # fits in --shutdown-grace (and so in a container engine's stop timeout sized to it).
        deadline = time.monotonic() + self.config.shutdown_grace
        self.engine.drain()
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        self.streams.end_idle()
        lost = 0
        try:
            parked = await asyncio.wait_for(
                self.engine.moves.hand_off(), self.config.shutdown_grace
            )
            if parked:
                log.info("parked %d sessions in the shared state store", parked)
        except (StoreUnavailable, TimeoutError) as exc:
            lost = self.engine.live_sessions
            if lost:
                log.error(
                    "could not hand %d sessions off to the shared state store (%s); they are lost",
                    lost,
                    exc or "timed out",
                )
                self.engine.metrics.lost.labels("drain").inc(lost)
        self.streams.end_idle()  # streams opened while the handoff ran
        await asyncio.gather(
            self.grpc_server.stop(max(0.0, deadline - time.monotonic())),
            *([self.http.stop()] if self.http is not None else []),
        )
        if self.internal is not None:
            await self.internal.stop(0)
        for task in self.tasks:
            task.cancel()
        await self.engine.shutdown()
        await asyncio.to_thread(self.engine.metrics.tracing.shutdown)  # spans still buffered
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        self.executor.shutdown(wait=False)
        return lost

    async def drain(self) -> int:
        """`stop` for the process's exit, and its exit status: 1 if sessions were lost,
        including when the drain itself is cancelled (the process then ends with them)."""
        held = self.engine.live_sessions
        try:
            lost = await self.stop()
        except asyncio.CancelledError:  # sessions may be out of the table, not yet parked
            log.error(
                "the drain was cancelled before it ended: up to %d sessions, those held "
                "when it began, are lost",
                held,
            )
            return 1
        if lost:
            log.error("stopped; %d sessions lost", lost)
            return 1
        log.info("stopped")
        return 0

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http is not None else None


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
    )


async def _every(period: float, action, what: str) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await action()
        except Exception:  # a failed poll or sweep is retried next period
            log.exception("%s failed", what)


def _bind_grpc(server: grpc.aio.Server, config: ServerConfig, shared: bool) -> int:
    """The gRPC port, exclusively: without SO_REUSEPORT a second server on the same port fails
    here instead of sharing it (clients would then alternate between the two). A worker
    (`shared`) joins its siblings on the port its supervisor checked and holds."""
    address = f"{config.host}:{config.grpc_port}"
    if config.grpc_port and not shared and not can_listen(config.host, config.grpc_port):
        raise PortUnavailable(
            f"--grpc-port {config.grpc_port}: {address} is in use (another server?)"
        )
    credentials = _credentials(config)
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if not port:
        raise PortUnavailable(
            f"--grpc-port {config.grpc_port}: cannot listen on {address} "
            "(in use by another server, or not an address of this host)"
        )
    return port


def _tracing(config: ServerConfig) -> Tracing:
    """--otlp-endpoint: spans through a batch processor to that OTLP/gRPC collector (http://
    for plaintext), a --trace-ratio of the traces begun here sampled, a caller's decision
    followed. The SDK is imported only then."""
    if not config.otlp_endpoint:
        return Tracing()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(config.trace_ratio)),
    )
    endpoint = config.otlp_endpoint
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


async def _start_http(door: HttpDoor, config: ServerConfig, shared: bool) -> int:
    """The HTTP door listening on --http-port (shared: a worker joining its siblings)."""
    tls = None
    if config.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(config.tls_cert, config.tls_key)
    try:
        return await door.start(config.host, config.http_port, shared, tls)
    except OSError as exc:
        raise PortUnavailable(
            f"--http-port {config.http_port}: cannot listen on {config.host}:"
            f"{config.http_port} ({exc.strerror or exc}); -1 disables the HTTP door"
        ) from None


async def _start_internal(engine: Engine, worker: WorkerPlace) -> grpc.aio.Server:
    internal = grpc.aio.server(
        interceptors=[SharedKeyInterceptor(SIBLING_KEY_HEADER, worker.sibling_key)]
    )
    siblings_pb2_grpc.add_SiblingsServicer_to_server(SiblingsServicer(engine), internal)
    path = socket_path(worker.run_dir, worker.index)
    path.unlink(missing_ok=True)  # left by this worker's crashed predecessor
    internal.add_insecure_port(f"unix:{path}")
    await internal.start()
    return internal


async def create_server(
    config: ServerConfig,
    registry: CollectorRegistry | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    runner: Callable[[ModelSpec, Path, str, int], Runner] = OrtRunner,
    tracing: Tracing | None = None,
    worker: WorkerPlace | None = None,
) -> Server:
    """Listen on config's ports (0 picks free ones), then load the models: health and readiness
    say NOT_SERVING until the first version is loaded, so probes see the load happen. `clock`
    (idle time) and `runner` (model runs) are what tests replace to control time and faults;
    `tracing` replaces the spans' way out (--otlp-endpoint's).

    A `worker` of a supervised server shares the port with its siblings and listens only once
    its models are loaded (the kernel then never hands it a connection it cannot serve); it
    answers its siblings' session lookups on a unix socket from the start."""
    return_freed_memory()
    identities = Identities.load(config.auth_token, config.auth_tokens_file)  # before slow work
    providers_for(config.device)  # --device cuda without a working CUDA provider stops here
    metrics = Metrics(registry or CollectorRegistry(), tracing or _tracing(config))
    executor = ThreadPoolExecutor(max_workers=config.batch_workers + 1, thread_name_prefix="ort")
    models = ModelRegistry(config, metrics, executor, runner)
    claims = (
        Claims(worker.run_dir, worker.index, config.max_sessions_per_client)
        if worker is not None and worker.count > 1
        else None
    )
    sessions = SessionTable(
        config.max_sessions,
        config.session_idle_timeout + config.session_ttl,  # past both, a session ends
        metrics,
        clock,
        max_per_client=config.max_sessions_per_client,
        claims=claims,
    )
    handoff = open_store(config)
    siblings = (
        Siblings(worker.run_dir, worker.index, worker.count, worker.sibling_key)
        if worker is not None and worker.count > 1
        else None
    )
    engine = Engine(config, models, sessions, MemoryBudget(config.memory_budget), handoff, siblings)
    internal = (
        await _start_internal(engine, worker)
        if siblings is not None and worker is not None
        else None
    )
    streams = OpenStreams()
    admission = Admission(
        config.max_concurrent_rpcs,
        OPEN_METHODS,
        read_slots(config),
        config.read_timeout,
        reader(identities),
    )
    interceptors = [
        *([BearerTokenInterceptor(identities)] if identities.enabled else []),
        admission,
    ]
    limits = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        ("grpc.so_reuseport", int(worker is not None)),
        # No window growth past the HTTP/2 default: a client that writes but never reads
        # then holds ~64 KiB of its stream's data here, not megabytes.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
        # Calls that arrived and wait for the event loop to take them: grpc core's
        # default (1,000) cancelled 161 of 2,000 unary calls sent at once on one channel.
        ("grpc.server.max_pending_requests", 2 * config.max_concurrent_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_concurrent_rpcs),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=limits)
    handlers = TolerantServer(server, metrics)  # undecodable requests: INVALID_ARGUMENT
    rnnserve_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(engine, metrics, identities, streams), handlers
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(engine, metrics, identities, streams), handlers
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        handlers,
    )
    port = _bind_grpc(server, config, shared=False) if worker is None else config.grpc_port
    http = start_metrics(config, metrics.registry)
    rest = (
        HttpDoor(
            DataPlane(engine),
            metrics,
            identities,
            admission,
            config.max_message_bytes,
            config.shutdown_grace,
        )
        if config.http_port >= 0
        else None
    )
    if worker is None:
        await server.start()
    started = Server(
        config=config,
        grpc_server=server,
        port=port,
        metrics_http=http,
        engine=engine,
        health=health_servicer,
        executor=executor,
        tasks=[],
        streams=streams,
        internal=internal,
        http=rest,
    )
    try:
        if rest is not None and worker is None:
            started.http_port = await _start_http(rest, config, shared=False)
        await started.sync_models()
        if not engine.ready:
            raise RuntimeError(f"no loadable model in {config.repository} (--repository)")
    except BaseException:  # a bad repository: stop what runs, so the error is the only output
        await started.stop()
        raise
    if worker is not None:  # gRPC listens as it binds: not before the models are loaded
        _bind_grpc(server, config, shared=True)
        await server.start()
        if rest is not None:
            try:
                started.http_port = await _start_http(rest, config, shared=True)
            except BaseException:
                await started.stop()
                raise

    async def sweep() -> None:
        await engine.sweep_idle()

    started.background(
        _every(min(EVICTION_PERIOD_MAX, config.session_idle_timeout / 4), sweep, "idle sweep"),
        "idle sweep",
    )
    if config.repository_poll > 0:
        started.background(
            _every(config.repository_poll, started.sync_models, "repository poll"),
            "repository poll",
        )
    if config.auth_tokens_file:
        started.background(
            _every(TOKENS_POLL, _TokensWatch(config, identities).check, "tokens file check"),
            "tokens file check",
        )
    if handoff is not None:  # sessions held here can be asked for by other replicas
        started.background(handoff.serve_releases(engine.moves.park_on_request), "release requests")
        started.background(
            _every(config.session_idle_timeout / 3, engine.moves.refresh_claims, "session records"),
            "session records",
        )
    metrics_at = (f"; HTTP on :{started.http_port}" if started.http_port is not None else "") + (
        f"; metrics on :{started.metrics_port}"
        if http is not None
        else "; metrics disabled"
        if worker is None
        else ""
    )
    log.info(
        "%sserving %s on %s:%d%s",
        f"worker {worker.index}: " if worker else "",
        ", ".join(f"{m.spec.name} v{m.spec.version}" for m in engine.models()),
        config.host,
        port,
        metrics_at,
    )
    return started


class _TokensWatch:
    """--auth-tokens-file read again when it changes (a rotated Kubernetes Secret is a new
    file behind the same path): tokens are replaced without a restart, which would drop every
    session. A file that does not parse leaves the tokens in force and says why, once."""

    def __init__(self, config: ServerConfig, identities: Identities) -> None:
        self.config = config
        self.identities = identities
        self.seen = self._stamp()
        self.reported = ""

    def _stamp(self) -> tuple:
        try:
            stat = os.stat(self.config.auth_tokens_file)
        except OSError as exc:
            return (exc.errno,)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    async def check(self) -> None:
        stamp = self._stamp()
        if stamp == self.seen:
            return
        self.seen = stamp
        try:
            changed = self.identities.reload(self.config.auth_token, self.config.auth_tokens_file)
        except ValueError as exc:
            if str(exc) != self.reported:
                self.reported = str(exc)
                log.error("tokens file not reloaded, the earlier tokens stay: %s", exc)
            return
        self.reported = ""
        if changed:
            log.info(
                "tokens reloaded from %s: %d clients",
                self.config.auth_tokens_file,
                len(self.identities.names),
            )


async def _rescan(server: Server) -> None:
    """SIGHUP: scan the repository now (new, changed and removed versions), as a poll would;
    without it a hang-up signal would end the process with no drain."""
    log.info("SIGHUP: scanning the model repository")
    try:
        await server.sync_models()
    except Exception:  # the server keeps what it serves; the next scan tries again
        log.exception("repository scan after SIGHUP failed")


async def serve(
    config: ServerConfig,
    worker: WorkerPlace | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain within --shutdown-grace. The exit status: 0, or
    1 if sessions were lost because the handoff to the shared store failed. `on_ready` gets
    the port once the server serves (a worker tells its supervisor)."""
    server = await create_server(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: server.background(_rescan(server), "SIGHUP rescan", lasting=False)
    )
    if on_ready is not None:
        on_ready(server.port)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.shutdown_grace)
    return await server.drain()
