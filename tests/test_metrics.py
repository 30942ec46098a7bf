"""/metrics over HTTP: the documented families with the right labels, in valid exposition format."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnserve.client import Client, RnnServeError
from tests.conftest import FakeClock, running


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_what_happened() -> None:
    clock = FakeClock()
    with running(clock=clock) as srv, Client(srv.address) as client:
        client.predict("binary_add", np.zeros((3, 8, 2), np.float32))
        with client.stream("echo") as stream:
            for bit in (1, 0, 1, 1):
                stream.step([bit])
            stream.step(np.ones((4, 1)))
            stream.detach()  # left open: the idle sweep ends it
        for name in ("nope", "nope-2"):  # unknown names share one label, not one each
            with pytest.raises(RnnServeError):
                client.predict(name, np.zeros((1, 1, 1)))
        families = scrape(srv.server.metrics_port)
        clock.advance(srv.server.config.session_idle_timeout + 1)
        assert srv.sweep() == 1
        after = scrape(srv.server.metrics_port)
    requests = families["rnnserve_requests"]
    assert (
        value(requests, "rnnserve_requests_total", model="binary_add", method="Predict", code="OK")
        == 1
    )
    assert (
        value(
            requests,
            "rnnserve_requests_total",
            method="Predict",
            code="NOT_FOUND",
            model="(unknown)",
        )
        == 2
    )
    assert (
        value(
            requests,
            "rnnserve_requests_total",
            model="echo",
            version="1",
            method="Stream",
            code="OK",
        )
        == 6
    )  # open + 5 step messages
    assert value(families["rnnserve_timesteps"], "rnnserve_timesteps_total", model="echo") == 8
    assert (
        value(families["rnnserve_timesteps"], "rnnserve_timesteps_total", model="binary_add") == 24
    )
    assert value(families["rnnserve_batch_size"], "rnnserve_batch_size_count", model="echo") == 5
    for family in (
        "rnnserve_request_duration_seconds",
        "rnnserve_queue_wait_seconds",
        "rnnserve_compute_seconds",
    ):
        assert value(families[family], f"{family}_count") >= 1, family
    assert value(families["rnnserve_sessions"], "rnnserve_sessions", model="echo") == 1
    assert value(after["rnnserve_sessions"], "rnnserve_sessions", model="echo") == 0
    assert (
        value(
            after["rnnserve_session_evictions"],
            "rnnserve_session_evictions_total",
            model="echo",
            reason="idle",
        )
        == 1
    )
    assert (
        value(families["rnnserve_model_events"], "rnnserve_model_events_total", event="load") == 4
    )
    assert "process_cpu_seconds" in families


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (.ci/run installs Debian's prometheus)",
)
def test_exposition_passes_promtool() -> None:
    with running() as srv, Client(srv.address) as client:
        client.predict("echo", np.zeros((2, 3, 1), np.float32))
        with client.stream("echo") as stream:
            stream.step([1.0])
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5
        ).read()
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_idle_connections_hold_no_thread_for_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that never send a request: at most MAX_CONNECTIONS threads, each for
    IDLE_TIMEOUT; a scrape answers once they are gone (prometheus-client's own server kept a
    thread per idle connection forever)."""
    import socket
    import threading
    import time

    from prometheus_client import CollectorRegistry, Counter

    from rnnserve.ops import metrics_http

    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.5)
    registry = CollectorRegistry()
    Counter("probe", "a counter to scrape", registry=registry).inc()
    before = threading.active_count()
    http = metrics_http.serve("127.0.0.1", 0, registry)
    port = http.server_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        time.sleep(0.2)
        assert threading.active_count() <= before + 1 + metrics_http.MAX_CONNECTIONS
        deadline = time.monotonic() + 10
        while threading.active_count() > before + 1:  # the serving thread stays
            assert time.monotonic() < deadline, threading.active_count() - before
            time.sleep(0.05)
        assert value(scrape(port)["probe"], "probe_total") == 1
    finally:
        for conn in idle:
            conn.close()
        http.shutdown()
        http.server_close()
