"""A local rnnserve cluster on loopback: replica processes, redis-server and nginx.

Shared by tests/test_scale_out.py and bench/scale_out.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TEMPLATE = ROOT / "deploy" / "nginx" / "rnnserve.conf.template"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """A process's CPU time (user + system) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> bool:
    """Until `proc` listens on the port (True), or has exited (False: e.g. the port was taken
    between free_port() and its bind)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return False


def on_free_port(launch, attempts: int = 5) -> tuple[int, subprocess.Popen]:
    """Start `launch(port)` on a free port, again on another if someone took it meanwhile."""
    for _ in range(attempts):
        port = free_port()
        proc = launch(port)
        if wait_for_port(port, proc):
            return port, proc
    raise RuntimeError(f"could not start {launch} on a free port in {attempts} attempts")


def wait_until_serving(address: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the server's health says SERVING (its models loaded), or its process ended."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while proc.poll() is None:
            try:
                if (
                    check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:g} s")
            time.sleep(0.05)


class ServerProcess:
    """`rnnserve serve` on the shipped models in its own process, its /proc status readable.

    Ports are picked free and then bound by the server exclusively: if another process took
    one in between, the server exits naming the flag, and it is started again on new ports."""

    ATTEMPTS = 5

    def __init__(
        self, log: Path, *flags: str, metrics: bool = False, wrapper: tuple[str, ...] = ()
    ) -> None:
        """One process (--workers 1) unless `flags` name --workers; `wrapper` is a command
        that runs the server (e.g. unshare, to put it in a PID namespace of its own)."""
        self.log = log
        if "--workers" not in flags:
            flags = ("--workers", "1", *flags)
        for _ in range(self.ATTEMPTS):
            self.port = free_port()
            self.metrics_port = free_port() if metrics else -1
            with open(log, "w") as err:
                self.proc = subprocess.Popen(
                    [
                        *wrapper,
                        sys.executable,
                        "-m",
                        "rnnserve",
                        "serve",
                        "--repository",
                        str(ROOT / "exported"),
                        "--grpc-port",
                        str(self.port),
                        "--metrics-port",
                        str(self.metrics_port),
                        *flags,
                    ],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            self.address = f"127.0.0.1:{self.port}"
            try:
                wait_until_serving(self.address, self.proc)
                if self.proc.poll() is None:
                    self._wait_for_every_worker(flags)
                    return
            except BaseException:
                self.stop()
                raise
            if "cannot listen" not in log.read_text():
                break
        raise RuntimeError(f"rnnserve did not start: {log.read_text()[-2000:]}")

    def _wait_for_every_worker(self, flags: tuple[str, ...]) -> None:
        """Health answers once one worker serves; the supervisor tells when all of them do
        (its rnnserve_workers gauge, or its log line when metrics are off)."""
        count = flags[flags.index("--workers") + 1]
        if count in ("1", "auto"):
            return
        deadline = time.monotonic() + 120
        while not (
            self.metric("rnnserve_workers") == int(count)
            if self.metrics_port > 0
            else f"with {count} workers" in self.log.read_text()
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rnnserve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The server's processes: the supervisor (or the only process) and its workers."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [self.proc.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.proc.pid]

    def cpu_seconds(self) -> float:
        """CPU time of every process of the server (user + system)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):  # a worker that just died
                total += cpu_seconds(pid)
        return total

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a family's samples with these labels (0 if it has none yet)."""
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " "))
            and all(f'{k}="{v}"' in line for k, v in labels.items())
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Drain and exit (workers included); killed if that takes too long."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


class Replica(ServerProcess):
    """A replica of a cluster: its own process, sharing a Redis state store."""

    def __init__(self, redis_url: str, log: Path, *flags: str) -> None:
        super().__init__(
            log,
            "--state-store",
            redis_url,
            "--shutdown-grace",
            "5",
            "--log-level",
            "warning",
            *flags,
            metrics=True,
        )


class Redis:
    def __init__(self, *flags: str) -> None:
        """redis-server on a free loopback port, nothing saved; `flags` are more of its own
        (e.g. --maxmemory 1mb)."""
        self.port, self.proc = on_free_port(
            lambda port: subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    *flags,
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Nginx:
    """nginx from deploy/nginx/rnnserve.conf.template, hashing sessions across `replicas`."""

    def __init__(self, prefix: Path, replicas: list[Replica]) -> None:
        servers = "\n".join(f"        server 127.0.0.1:{r.port};" for r in replicas)
        conf = prefix / "nginx.conf"

        def launch(port: int) -> subprocess.Popen:
            conf.write_text(
                TEMPLATE.read_text()
                .replace("@LISTEN@", str(port))
                .replace("@SERVERS@", servers)
                .replace("@PREFIX@", str(prefix))
            )
            with open(prefix / "nginx.log", "w") as log:
                return subprocess.Popen(
                    ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], stderr=log
                )

        self.port, self.proc = on_free_port(launch)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(10)
