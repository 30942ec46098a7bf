"""The Dockerfile, Makefile and CLI stay consistent with the server (no Docker engine here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from rnnserve import __version__
from rnnserve.ops.config import ENV_PREFIX, ServerConfig
from tests.conftest import ROOT, RunningServer

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in INSTRUCTIONS if line.startswith(keyword + " ")]


def test_image_environment_names_real_flags_and_fits_docker_stop() -> None:
    """What the image sets is checked here on every run; the image itself is built and run on
    a real engine by tests/container (make test-container)."""
    env = dict(re.findall(r"(RNNSERVE_\w+)=(\S+)", " ".join(instructions("ENV"))))
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)}
    assert set(env) <= known, set(env) - known
    exposed = {int(p) for line in instructions("EXPOSE") for p in line.split()}
    ports = ("RNNSERVE_GRPC_PORT", "RNNSERVE_HTTP_PORT", "RNNSERVE_METRICS_PORT")
    assert exposed == {int(env[name]) for name in ports}
    # gRPC and metrics on the server's own defaults; HTTP, off by default, opened on 8080
    assert exposed - {8080} == {ServerConfig.grpc_port, ServerConfig.metrics_port}
    (health,) = instructions("HEALTHCHECK")
    assert health.endswith('CMD ["rnnserve", "health"]')  # its port and TLS: the server's env
    assert float(env["RNNSERVE_SHUTDOWN_GRACE"]) + 2 <= 10  # docker stop's default timeout


def test_ci_runs_what_the_readme_tells_users() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (ROOT / "README.md").read_text()


def test_health_command_against_a_live_server(server: RunningServer) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "rnnserve", "health", "--address", server.address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run(
        [sys.executable, "-m", "rnnserve", "health", "--address", "127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1


def test_stream_command_echoes_bits_three_lines_later(server: RunningServer) -> None:
    bits = [1, 0, 1, 1, 0, 0, 1, 0]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "stream",
            "--model",
            "echo",
            "--address",
            server.address,
        ],
        input="\n".join(map(str, bits)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [list(map(float, line.split())) for line in out.stdout.splitlines()]
    assert [int(p[1] > p[0]) for p in lines][3:] == bits[:-3]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "stream",
            "--model",
            "echo",
            "--address",
            server.address,
        ],
        input="1 2\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_server_reflection_lists_the_services(server: RunningServer) -> None:
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"rnnserve.v1.Inference", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("rnnserve.v1.Inference")
        assert descriptor.package == "rnnserve.v1"


def _serve(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "serve",
            "--repository",
            str(ROOT / "exported"),
            "--models",
            "echo",
            *flags,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_busy_ports_fail_in_one_line_naming_the_flag(server: RunningServer) -> None:
    """gRPC's SO_REUSEPORT default would let a second server share the port (clients would
    alternate between the two): it must fail instead."""
    second = _serve("--grpc-port", str(server.server.port), "--metrics-port", "-1")
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert f"--grpc-port {server.server.port}" in json.loads(line)["message"]
    busy_metrics = _serve("--grpc-port", "0", "--metrics-port", str(server.server.metrics_port))
    assert busy_metrics.returncode == 2
    (line,) = busy_metrics.stderr.strip().splitlines()
    assert f"--metrics-port {server.server.metrics_port}" in json.loads(line)["message"]


def test_version_flags_and_client_help() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "rnnserve", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.strip() == f"rnnserve {__version__}"
    for command in ("health", "models", "predict", "stream"):
        text = subprocess.run(
            [sys.executable, "-m", "rnnserve", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for flag in ("--address", "--tls-ca", "--token", "RNNSERVE_TLS_CA"):
            assert flag in text, (command, flag)
        if command in ("predict", "stream"):
            assert "--model-version" in text


def test_make_serve_honours_rnnserve_variables(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "exported" / "echo", repo / "echo")
    env = {
        **os.environ,
        "RNNSERVE_REPOSITORY": str(repo),
        "RNNSERVE_GRPC_PORT": "0",
        "RNNSERVE_METRICS_PORT": "-1",
        "RNNSERVE_WORKERS": "1",
    }
    log = tmp_path / "log"
    with open(log, "w") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "serving" not in log.read_text() and make.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(60)
    (line,) = [json.loads(ln) for ln in log.read_text().splitlines() if "serving" in ln]
    assert line["message"].startswith("serving echo v1 on 127.0.0.1:")
    assert line["message"].endswith("; metrics disabled")
