"""The supervisor as PID 1, as under plain `docker run` (no --init), reproduced without Docker:
`unshare --pid --fork` gives it a PID namespace of its own, where it is PID 1.

Two things go wrong for PID 1 that never do elsewhere: its workers' parent is PID 1 (a worker
that took "my parent is PID 1" for "my parent died" ended itself at every start, forever), and
the kernel hands it every orphan of the namespace to reap.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.cluster import ServerProcess
from rnnserve.client import Client


def namespace_pid(pid: int) -> list[int]:
    """The pid in each PID namespace the process is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def in_pid_namespace(log: Path, workers: int) -> ServerProcess:
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode
        != 0
    ):
        pytest.fail(
            "unshare --pid cannot run here (needs root or user namespaces): the "
            "container case is untested"
        )
    return ServerProcess(
        log,
        "--workers",
        str(workers),
        metrics=True,
        wrapper=("unshare", "--pid", "--fork", "--kill-child"),
    )


@pytest.mark.parametrize("workers", [2, 1])
def test_workers_serve_with_their_supervisor_as_pid_1(workers: int, tmp_path: Path) -> None:
    """One worker too: as PID 1 the server still runs a supervisor, which reaps."""
    server = in_pid_namespace(tmp_path / "log", workers)
    try:
        check_pid_1(server, workers)
    finally:
        server.kill()


def check_pid_1(server: ServerProcess, workers: int) -> None:
    (supervisor,) = children(server.proc.pid)
    assert namespace_pid(supervisor)[-1] == 1
    deadline = time.monotonic() + 60
    while server.metric("rnnserve_workers") < workers:  # the supervisor's own gauge
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.1)
    time.sleep(2)  # a worker that ends itself at start is restarted within this
    assert server.metric("rnnserve_worker_restarts") == 0
    assert server.metric("rnnserve_workers") == workers
    liveness = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "health",
            "--address",
            server.address,
            "--service",
            "liveness",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert liveness.stdout.strip() == "SERVING", liveness.stderr
    xs = np.random.default_rng(3).integers(0, 2, (4, 12, 2)).astype(np.float32)
    with Client(server.address) as client:
        whole = client.predict("binary_add", xs).y
    for row in range(len(xs)):  # a connection each: the kernel spreads them over the workers
        with Client(server.address) as client, client.stream() as stream:
            stream.open("binary_add")
            got = np.concatenate([stream.step(xs[row, :5]), stream.step(xs[row, 5:])])
        np.testing.assert_allclose(got, whole[row], rtol=0, atol=1e-6)

    # An orphan in the namespace is handed to PID 1, which must reap it.
    subprocess.run(
        ["nsenter", "--target", str(supervisor), "--pid", "--", "sh", "-c", "sleep 0.2 & exit 0"],
        check=True,
    )
    time.sleep(1.5)
    zombies = [p for p in children(supervisor) if state(p) == "Z"]
    assert not zombies, f"orphans left unreaped: {zombies}"
    assert server.metric("rnnserve_workers") == workers

    os.kill(supervisor, signal.SIGTERM)  # what `docker stop` sends to PID 1
    assert server.proc.wait(30) == 0
    assert "worst exit status 0" in server.log.read_text()
