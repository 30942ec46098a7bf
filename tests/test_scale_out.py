"""Two replicas behind a real nginx, sessions pinned by id, one replica drained mid-stream.

Everything runs on loopback: redis-server and nginx from Debian's packages (.ci/run installs
them), the replicas as real `rnnserve serve` processes.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench.cluster import Nginx, Replica
from rnnserve.client import Client, RnnServeError

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("redis-server") is None,
    reason="nginx and redis-server not installed (.ci/run installs them)",
)

SESSIONS = 200
STEPS = 24
RECONNECT_FOR = 20.0
LOCK = threading.Lock()


def drive(
    address: str, model: str, x: np.ndarray, progress: list[int], opened: list[int]
) -> tuple[str, list]:
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
    nginx = Nginx(tmp_path, replicas)
    address = nginx.address
    try:
        rng = np.random.default_rng(0)
        work = [
            (
                "echo" if i % 2 else "binary_add",
                rng.integers(0, 2, (STEPS, 1 if i % 2 else 2)).astype(np.float32),
            )
            for i in range(SESSIONS)
        ]
        with Client(address) as client:
            expected = [client.predict(model, x[None]).y[0] for model, x in work]
        progress, opened = [0], [0]
        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(drive, address, model, x, progress, opened) for model, x in work]
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
        nginx.stop()
        for replica in replicas:
            replica.kill()
