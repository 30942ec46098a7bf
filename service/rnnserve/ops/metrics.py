"""Prometheus metrics, built once on a CollectorRegistry that is passed in (tests use their own)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from rnnserve.errors import ServingError
from rnnserve.ops.tracing import Tracing

MODEL = ("model", "version")
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Call:
    """One tracked call: counted and timed when it ends, the code taken from the exception that
    ends it, if any, and a server span when tracing is on. Labels are learned as it goes (the
    model is known only after parsing)."""

    __slots__ = ("metrics", "method", "model", "version", "client", "started", "span")

    def __init__(self, metrics: Metrics, method: str, client: str = "") -> None:
        self.metrics = metrics
        self.method = method
        self.model = ""
        self.version = ""
        self.client = client

    def __enter__(self) -> Call:
        tracing = self.metrics.tracing
        self.span = tracing.start_call(self.method) if tracing.on else None
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            code = "OK"
        elif isinstance(exc, ServingError):
            code = exc.code
        else:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
        count, latency = self.metrics.children(
            self.model, self.version, self.method, code, self.client
        )
        count.inc()
        latency.observe(time.perf_counter() - self.started)
        if self.span is not None:
            attributes = {"rnnserve.method": self.method, "rnnserve.code": code}
            if self.model:
                attributes.update({"rnnserve.model": self.model, "rnnserve.version": self.version})
            if self.client:
                attributes["rnnserve.client"] = self.client
            self.metrics.tracing.end_call(self.span, attributes, "" if code == "OK" else code)


class Metrics:
    def __init__(self, registry: CollectorRegistry, tracing: Tracing | None = None) -> None:
        self.registry = registry
        self.tracing = tracing or Tracing()
        """OpenTelemetry spans beside the series (off unless --otlp-endpoint)."""
        self.requests = Counter(
            "rnnserve_requests",
            "Requests (stream messages count singly) by "
            "method, gRPC status code and client (a name from "
            '--auth-tokens-file, "" without auth)',
            [*MODEL, "method", "code", "client"],
            registry=registry,
        )
        self.latency = Histogram(
            "rnnserve_request_duration_seconds",
            "Time from request received to response ready",
            [*MODEL, "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "rnnserve_queue_wait_seconds",
            "Time work waited in the batcher before its run started",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute = Histogram(
            "rnnserve_compute_seconds",
            "ONNX Runtime time per batch run",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Rows (sequences or sessions) per ONNX Runtime run",
            MODEL,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.timesteps = Counter(
            "rnnserve_timesteps", "Timesteps processed", MODEL, registry=registry
        )
        self.sessions = Gauge(
            "rnnserve_sessions",
            "Live sessions",
            MODEL,
            registry=registry,
            multiprocess_mode="livesum",
        )  # with --workers: their sum
        self.evictions = Counter(
            "rnnserve_session_evictions",
            "Sessions ended by the server, by reason",
            [*MODEL, "reason"],
            registry=registry,
        )
        self.handoffs = Counter(
            "rnnserve_session_handoffs",
            "Sessions moved: parked in the state store (on drain), spilled to it (idle), "
            "released to another replica, adopted from it, moved between workers",
            [*MODEL, "direction"],
            registry=registry,
        )
        self.lost = Counter(
            "rnnserve_sessions_lost",
            "Sessions lost, by where: drain (the "
            "shared store could not take them), move (between workers), store "
            "(taken from the store, could not be parked again, or its record unreadable)",
            ["reason"],
            registry=registry,
        )
        self.model_events = Counter(
            "rnnserve_model_events",
            "Model version loads and unloads",
            [*MODEL, "event"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str, str, str], tuple[Any, Any]] = {}
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    def track(self, method: str, client: str = "") -> Call:
        """`with metrics.track(name) as call:` counts and times one call (or stream message)."""
        return Call(self, method, client)

    def children(
        self, model: str, version: str, method: str, code: str, client: str = ""
    ) -> tuple[Any, Any]:
        """The request counter and latency histogram for these labels, looked up once: a
        streamed step must not pay prometheus-client's labels() on every message."""
        key = (model, version, method, code, client)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (
                self.requests.labels(*key),
                self.latency.labels(model, version, method),
            )
        return found
