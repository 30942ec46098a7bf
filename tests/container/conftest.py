"""The image as users run it: built by `make docker` and started by a real Docker engine.

The engine is whatever `docker` (or $DOCKER) reaches through DOCKER_HOST; CI starts one with
../shared/container/engine.sh. Containers use the host's network (that engine has no bridge),
so each one listens on free loopback ports set through RNNSERVE_GRPC_PORT / _METRICS_PORT:
the image's own defaults are overridden exactly as a user moving a port would.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import free_port
from tests.conftest import ROOT

DOCKER = os.environ.get("DOCKER", "docker")
IMAGE = os.environ.get("RNNSERVE_TEST_IMAGE", "rnnserve-test")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def build(target: str, tag: str) -> None:
    """`make docker` / `make docker-gpu` as a user runs them, plus the host network (the test
    engine has no bridge) and the CA bundle as the documented BuildKit secret, so the build
    also works behind a TLS-inspecting proxy."""
    flags = ["--network host"]
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if bundle and Path(bundle).is_file():
        flags.append(f"--secret id=pipca,src={bundle}")
    started = time.monotonic()
    made = subprocess.run(
        [
            "make",
            target,
            f"DOCKER={DOCKER}",
            f"IMAGE={tag}",
            f"DOCKER_BUILD_ARGS={' '.join(flags)}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    print(f"make {target}: {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def engine() -> None:
    try:
        docker("version", timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(
            f"no Docker engine answers `{DOCKER} version` (DOCKER_HOST="
            f"{os.environ.get('DOCKER_HOST', 'unset')}): {exc}. Start one, e.g. "
            "../shared/container/engine.sh >/tmp/dk-host && "
            "export DOCKER_HOST=$(cat /tmp/dk-host) (not `$(engine.sh)`: the daemon it "
            "starts holds that pipe open)"
        )


@pytest.fixture(scope="session")
def image(engine: None) -> str:
    build("docker", IMAGE)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"{IMAGE}: {size / 1e6:.0f} MB")
    return IMAGE


class Container:
    """One `docker run -d` of the image, on free loopback ports."""

    def __init__(
        self, image: str, *flags: str, env: dict[str, str] | None = None, workers: int = 2
    ) -> None:
        self.name = f"rnnserve-test-{uuid.uuid4().hex[:8]}"
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        settings = {
            "RNNSERVE_HOST": "127.0.0.1",
            "RNNSERVE_GRPC_PORT": str(self.port),
            "RNNSERVE_METRICS_PORT": str(self.metrics_port),
            "RNNSERVE_HTTP_PORT": str(self.http_port),
            "RNNSERVE_WORKERS": str(workers),
            **(env or {}),
        }
        env_flags = [item for key, value in settings.items() for item in ("-e", f"{key}={value}")]
        docker("run", "-d", "--network", "host", "--name", self.name, *env_flags, *flags, image)

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def messages(self) -> list[str]:
        return [
            json.loads(line)["message"] for line in self.logs().splitlines() if line.startswith("{")
        ]

    def wait_serving(self, timeout: float = 120, credentials=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"the container stopped: {self.logs()[-3000:]}")
            channel = (
                grpc.secure_channel(f"localhost:{self.port}", credentials)
                if credentials
                else grpc.insecure_channel(self.address)
            )
            with channel:
                try:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(health_pb2.HealthCheckRequest(), timeout=2)
                        .status
                    )
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.3)
        raise AssertionError(f"not SERVING after {timeout} s: {self.logs()[-3000:]}")

    def wait_health(self, wanted: str = "healthy", timeout: float = 90) -> None:
        """Docker's own HEALTHCHECK verdict (the image's probe, run by the engine)."""
        deadline = time.monotonic() + timeout
        while (status := self.state().get("Health", {}).get("Status")) != wanted:
            assert time.monotonic() < deadline, f"health {status!r}: {self.state()['Health']}"
            time.sleep(1)

    def stop(self, *flags: str) -> tuple[int, float]:
        """`docker stop` (Docker's default timeout unless flags say otherwise): the exit
        code and how long the stop took."""
        started = time.monotonic()
        docker("stop", *flags, self.name, timeout=120)
        return self.state()["ExitCode"], time.monotonic() - started

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def containers(image: str) -> Iterator[list[Container]]:
    """Containers a test starts; each one is removed after it."""
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()
