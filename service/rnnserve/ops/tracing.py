"""OpenTelemetry traces of calls and steps: off by default, on with --otlp-endpoint.

Off, every hook is one attribute test (`tracing.on`) and nothing of OpenTelemetry's SDK is
imported. On, each call or stream message is a server span, the child of the caller's W3C
`traceparent` (gRPC metadata or HTTP header) when it sends one, and a step adds its own spans
beneath it: the wait for memory and session locks (when it had to wait), the wait in the
batcher's queue, the model run (with its batch size) and the commit. Spans carry model,
version, session ids and counts, never tensor values. A batched run serves several calls at
once: each of them gets its own "model run" span, with the run's times and batch size, so every
trace is whole. The server process builds the provider (server.py: a batch processor to an
OTLP/gRPC collector); this module knows only OpenTelemetry's API and a provider.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

SERVICE_NAME = "rnnserve"


class Tracing:
    """What the doors, the step pipeline and the batchers call; `on` False makes each a no-op
    its caller skips."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.on = provider is not None
        self.tracer = provider.get_tracer(SERVICE_NAME) if provider is not None else None

    def incoming(self, headers: Iterable[tuple[str, Any]] | None) -> object:
        """Make the caller's trace context (traceparent, tracestate) current for this task;
        the token `leave` takes."""
        carrier = {k.lower(): v for k, v in headers or () if isinstance(v, str)}
        return otel_context.attach(propagate.extract(carrier))

    @staticmethod
    def leave(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    def start_call(self, method: str) -> tuple[Any, object]:
        """A server span for one call or stream message, made current; `end_call` ends it."""
        assert self.tracer is not None
        span = self.tracer.start_span(method, kind=trace.SpanKind.SERVER)
        return span, otel_context.attach(trace.set_span_in_context(span))

    @staticmethod
    def end_call(started: tuple[Any, object], attributes: dict[str, str], error: str) -> None:
        span, token = started
        otel_context.detach(token)  # type: ignore[arg-type]
        span.set_attributes(attributes)
        if error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    @staticmethod
    def context() -> Context | None:
        """The current context, for spans recorded later (a queued work's run); None when the
        current span is not sampled, so nothing is recorded beneath it."""
        if not trace.get_current_span().is_recording():
            return None
        return otel_context.get_current()

    @staticmethod
    def recording() -> bool:
        """Whether the current span is sampled: a step under an unsampled call records none."""
        return trace.get_current_span().is_recording()

    def record(
        self,
        name: str,
        parent: Context | None,
        start: float,
        end: float,
        attributes: dict[str, Any],
        clock: float,
    ) -> None:
        """A finished span from `start` to `end` on a monotonic clock that reads `clock` now,
        the child of `parent` (the current context when None, which the caller has checked is
        sampled)."""
        assert self.tracer is not None
        now = time.time_ns()
        span = self.tracer.start_span(
            name,
            context=parent,
            attributes=attributes,
            start_time=now - int((clock - start) * 1e9),
        )
        span.end(end_time=now - int((clock - end) * 1e9))

    def shutdown(self) -> None:
        """Send what is still buffered (within the processor's own timeout)."""
        if self.provider is not None:
            self.provider.shutdown()


def session_attributes(count: int, only: str, labels: tuple[str, str]) -> dict[str, Any]:
    """A step's attributes: its model, version and how many sessions it steps (`only`, the id,
    when it steps one)."""
    found: dict[str, Any] = {
        "rnnserve.model": labels[0],
        "rnnserve.version": labels[1],
        "rnnserve.sessions": count,
    }
    if only:
        found["rnnserve.session_id"] = only
    return found
