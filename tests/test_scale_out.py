"""Two replicas behind a real nginx, sessions pinned by id, one replica drained mid-stream.

Everything runs on loopback: redis-server and nginx from Debian's packages (.ci/run installs
them), the replicas as real `rnnserve serve` processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.client import Client, RnnServeError
from tests.conftest import EXPORTED, ROOT, free_port, wait_for_port

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("redis-server") is None,
    reason="nginx and redis-server not installed (.ci/run installs them)")

SESSIONS = 200
STEPS = 24
RECONNECT_FOR = 20.0
LOCK = threading.Lock()


class Replica:
    def __init__(self, redis_url: str, log: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--repository", str(EXPORTED),
                 "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port),
                 "--state-store", redis_url, "--shutdown-grace", "5", "--log-level", "warning"],
                cwd=ROOT, env=env, stderr=out)
        wait_for_port(self.port, 60)

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_nginx(prefix: Path, listen: int, replicas: list[Replica]) -> subprocess.Popen:
    template = (ROOT / "deploy" / "nginx" / "rnnserve.conf.template").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{r.port};" for r in replicas)
    conf = prefix / "nginx.conf"
    conf.write_text(template.replace("@LISTEN@", str(listen)).replace("@SERVERS@", servers)
                    .replace("@PREFIX@", str(prefix)))
    proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stderr=open(prefix / "nginx.log", "w"))
    wait_for_port(listen)
    return proc


def drive(address: str, model: str, x: np.ndarray, progress: list[int],
          opened: list[int]) -> tuple[str, list]:
    """Stream one session through the proxy; after any failure, resume it by id and go on."""
    outputs: list[np.ndarray] = []
    with Client(address, timeout=30) as client:
        stream = client.stream(model)
        session_id = stream.session.session_id
        with LOCK:
            opened[0] += 1
        while True:
            try:
                while len(outputs) < len(x):
                    outputs.append(stream.step(x[len(outputs)]))
                    with LOCK:
                        progress[0] += 1
                    time.sleep(0.01)
                stream.close()
                break
            except RnnServeError:
                stream.cancel()
                stream = reconnect(client, session_id, len(outputs))
        stream.end()
    return session_id, outputs


def reconnect(client: Client, session_id: str, steps_done: int):
    deadline = time.monotonic() + RECONNECT_FOR
    while True:
        try:
            stream = client.stream(resume=session_id)
            assert stream.session.steps == steps_done  # exactly where it stopped
            return stream
        except RnnServeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_sessions_survive_a_replica_drain_behind_nginx(redis_url: str, tmp_path: Path) -> None:
    replicas = [Replica(redis_url, tmp_path / f"replica{i}.log") for i in range(2)]
    listen = free_port()
    nginx = start_nginx(tmp_path, listen, replicas)
    address = f"127.0.0.1:{listen}"
    try:
        rng = np.random.default_rng(0)
        work = [("echo" if i % 2 else "binary_add",
                 rng.integers(0, 2, (STEPS, 1 if i % 2 else 2)).astype(np.float32))
                for i in range(SESSIONS)]
        with Client(address) as client:
            expected = [client.predict(model, x[None]).y[0] for model, x in work]
        progress, opened = [0], [0]
        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(drive, address, model, x, progress, opened)
                       for model, x in work]
            while opened[0] < SESSIONS or progress[0] < SESSIONS * STEPS // 3:
                assert not any(f.done() and f.exception() for f in futures)
                time.sleep(0.01)
            drained = replicas[0]
            drained.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert drained.proc.wait(30) == 0
        ids = [session_id for session_id, _ in results]
        assert len(set(ids)) == SESSIONS  # none lost, none duplicated
        for (_, outputs), want in zip(results, expected):
            assert len(outputs) == STEPS
            assert np.max(np.abs(np.concatenate(outputs) - want)) <= 1e-5
        adopted = replicas[1].metric("rnnserve_session_handoffs_total", direction="adopted")
        assert 0 < adopted < SESSIONS  # the drained replica's share moved over
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        for replica in replicas:
            replica.proc.kill()
            replica.proc.wait(10)
