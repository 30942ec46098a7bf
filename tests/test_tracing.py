"""OpenTelemetry traces over the wire: each door continues its caller's W3C traceparent, and a
step's spans (admission wait, batch queue, model run, commit) sit beneath its call's, with
models and session ids but no tensor values; spans reach a real OTLP/gRPC receiver."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rnnserve.ops.tracing import Tracing
from tests.conftest import running

grpcclient = pytest.importorskip("tritonclient.grpc")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ATTRIBUTES = {
    "rnnserve.method",
    "rnnserve.code",
    "rnnserve.model",
    "rnnserve.version",
    "rnnserve.client",
    "rnnserve.sessions",
    "rnnserve.session_id",
    "rnnserve.batch_rows",
    "rnnserve.timesteps",
    "rnnserve.thread",
}
"""Every attribute a span may carry: names, counts and ids, never tensor values."""


@pytest.fixture(scope="module")
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running(tracing=Tracing(provider), http_port=0) as server:
        yield server, exporter


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        if f"{span.context.trace_id:032x}" == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


def check_step_trace(found: dict[str, list], call: str) -> None:
    (server_span,) = found[call]
    assert f"{server_span.parent.span_id:016x}" == PARENT_ID  # the caller's span
    for name in ("batch queue", "model run", "commit"):
        assert found[name], f"no {name!r} span beneath {call}"
        for span in found[name]:
            assert span.parent.span_id == server_span.context.span_id, name
            assert span.start_time <= span.end_time
    assert found["model run"][0].attributes["rnnserve.batch_rows"] >= 1
    for spans in found.values():
        for span in spans:
            assert set(span.attributes) <= ATTRIBUTES, span.attributes


def test_a_v2_sequence_step_over_grpc_continues_the_callers_trace(traced) -> None:
    server, exporter = traced
    client = grpcclient.InferenceServerClient(server.address)
    x = grpcclient.InferInput("x", [1, 1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1, 1), np.float32))
    client.infer(
        "echo", [x], sequence_id=77, sequence_start=True, headers={"traceparent": TRACEPARENT}
    )
    client.close()
    found = spans_of(exporter, TRACE_ID)
    check_step_trace(found, "ModelInfer")
    (server_span,) = found["ModelInfer"]
    assert server_span.attributes["rnnserve.model"] == "echo"
    assert found["commit"][0].attributes["rnnserve.session_id"]  # the sequence's session
    exporter.clear()


def test_an_http_infer_and_a_native_stream_step_too(traced) -> None:
    server, exporter = traced
    body = {"inputs": [{"name": "x", "shape": [1, 2, 1], "datatype": "FP32", "data": [1, 0]}]}
    body["parameters"] = {"sequence_id": 78, "sequence_start": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}/v2/models/echo/infer",
        data=json.dumps(body).encode(),
        headers={"traceparent": TRACEPARENT},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
    check_step_trace(spans_of(exporter, TRACE_ID), "http/ModelInfer")
    exporter.clear()

    with server.client() as client:
        client.metadata = (*client.metadata, ("traceparent", TRACEPARENT))
        with client.stream() as stream:
            stream.open("echo")
            stream.step([[1.0], [0.0]])
    found = spans_of(exporter, TRACE_ID)
    assert len(found["Stream"]) == 3  # open, step, close: one span per message
    steps = [s for s in found["Stream"] if s.attributes.get("rnnserve.model")]
    assert steps and all(f"{s.parent.span_id:016x}" == PARENT_ID for s in found["Stream"])
    assert {s.parent.span_id for s in found["model run"]} <= {s.context.span_id for s in steps}
    exporter.clear()


def test_a_step_that_waits_for_its_sessions_lock_says_how_long(traced) -> None:
    server, exporter = traced
    with server.client() as client:
        session = client.open_session("echo")
        lock = server.server.engine._sessions.get(session.session_id).lock
        server.call(lock.acquire())
        client.metadata = (*client.metadata, ("traceparent", TRACEPARENT))
        stepping = threading.Thread(target=client.step, args=(session.session_id, [[1.0]]))
        stepping.start()
        time.sleep(0.2)
        server.loop.call_soon_threadsafe(lock.release)
        stepping.join(10)
    (wait,) = spans_of(exporter, TRACE_ID)["admission wait"]
    assert (wait.end_time - wait.start_time) / 1e9 >= 0.15
    assert wait.attributes["rnnserve.session_id"] == session.session_id
    exporter.clear()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as a collector is one."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_grpc_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the batch processor's period, ms
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        with running(otlp_endpoint=f"http://127.0.0.1:{port}") as server:
            client = grpcclient.InferenceServerClient(server.address)
            x = grpcclient.InferInput("x", [1, 1, 1], "FP32")
            x.set_data_from_numpy(np.ones((1, 1, 1), np.float32))
            client.infer("echo", [x], headers={"traceparent": TRACEPARENT})
            client.close()
            deadline = time.monotonic() + 10
            names: set[str] = set()
            while time.monotonic() < deadline and "model run" not in names:
                time.sleep(0.05)
                names = {
                    span.name
                    for request in receiver.requests
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                    if span.trace_id.hex() == TRACE_ID
                }
        assert {"ModelInfer", "batch queue", "model run"} <= names, names
        services = {
            attribute.value.string_value
            for request in receiver.requests
            for resource in request.resource_spans
            for attribute in resource.resource.attributes
            if attribute.key == "service.name"
        }
        assert services == {"rnnserve"}
    finally:
        collector.stop(0)
