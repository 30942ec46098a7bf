"""The server as a process: peak memory under the largest requests its defaults allow stays in
the budget's container, health answers throughout, and a drain ends idle streams at once with
JSON logs and an honest exit status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench.cluster import ServerProcess, free_port
from rnnserve.client import Client, RnnServeError
from rnnserve.ops.config import ServerConfig

CONTAINER_LIMIT = 1024 * 2**20
"""deploy/kubernetes/overlays/cpu's memory limit, which the defaults are sized for."""
HEALTH_PROBE = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
worst = 0.0
while sys.stdin.readline():
    start = time.perf_counter()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    worst = max(worst, time.perf_counter() - start)
    print(worst, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_largest_default_requests_stay_within_the_container(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "log", "--log-level", "warning")
    probe = subprocess.Popen(
        [sys.executable, "-c", HEALTH_PROBE, server.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    worst = [0.0]

    def watch() -> None:
        while not stop.is_set():
            probe.stdin.write("\n")
            probe.stdin.flush()
            worst[0] = float(probe.stdout.readline())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        defaults = ServerConfig()
        rows = defaults.max_batch_rows
        steps = (defaults.max_message_bytes - 4096) // (rows * 4)  # largest forecast x allowed
        x = np.random.default_rng(0).uniform(320, 370, (rows, steps, 1)).astype(np.float32)
        peaks = []
        for concurrent in (1, 4):
            with ThreadPoolExecutor(concurrent) as pool:
                results = list(pool.map(lambda _: _predict(server.address, x), range(concurrent)))
            assert all(r == "OK" or "retry" in r for r in results), results
            assert results.count("OK") >= 1
            peaks.append(server.status("VmHWM"))
        too_big = _predict(server.address, np.zeros((rows, steps, 1), np.float32), last=False)
        assert too_big.startswith("RESOURCE_EXHAUSTED") and "OUTPUT_MODE_LAST_STEP" in too_big
        print(
            f"VmHWM MiB after 1 and 4 at once: {[p // 2**20 for p in peaks]}, "
            f"health worst {worst[0]:.3f} s, VmRSS after {server.status('VmRSS') // 2**20}"
        )
        assert max(peaks) < CONTAINER_LIMIT, [p / 2**20 for p in peaks]
        assert server.status("VmRSS") < max(peaks), "memory goes back after big runs"
        assert worst[0] < 1.0, f"health took {worst[0]:.2f} s"
    finally:
        stop.set()
        watcher.join(10)
        probe.kill()
        server.stop()


def _predict(address: str, x: np.ndarray, last: bool = True) -> str:
    try:
        with Client(address, timeout=300) as client:
            client.predict("forecast", x, last_only=last)
    except RnnServeError as exc:
        return f"{exc.code.name}: {exc.message}"
    return "OK"


def test_drain_ends_idle_streams_at_once_with_json_logs(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "log", "--shutdown-grace", "60")
    try:
        with Client(server.address) as client, client.stream("echo") as idle:
            idle.step([1.0])
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(RnnServeError) as err:
                idle.step([1.0])
            assert err.value.code.name == "UNAVAILABLE"
            assert "open a new session" in err.value.message  # no store: no resume promise
            assert server.proc.wait(30) == 0
            assert time.monotonic() - started < 30, "idle streams must not hold the drain"
    finally:
        server.stop()
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_failed_handoff_exits_nonzero_and_counts_the_lost(tmp_path: Path) -> None:
    dead_store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = ServerProcess(tmp_path / "log", "--state-store", dead_store, "--shutdown-grace", "5")
    try:
        with Client(server.address) as client:
            for _ in range(3):
                client.open_session("echo")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 1
    finally:
        server.stop()
    messages = [json.loads(line)["message"] for line in (tmp_path / "log").read_text().splitlines()]
    assert any("3 sessions lost" in m for m in messages), messages
