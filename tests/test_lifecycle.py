"""Start-up, repository changes, SIGTERM drain, TLS and configuration from the environment."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import Client, RnnServeError
from rnnserve.ops.config import ServerConfig, add_arguments, from_namespace
from tests.conftest import EXPORTED, ROOT, running, self_signed


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_repository_poll_loads_and_retires_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXPORTED / "echo", repo / "echo")
    with running(repository=repo, repository_poll=0.1) as srv, srv.client() as client:
        assert [m.version for m in client.list_models()] == [1]
        pinned = client.open_session("echo")
        v2 = repo / "echo" / "2"
        shutil.copytree(repo / "echo" / "1", v2)
        text = (v2 / "model.json").read_text().replace('"version": 1', '"version": 2')
        (v2 / "model.json").write_text(text)
        wait_for(lambda: client.get_model("echo").version == 2)
        assert list(client.get_model("echo").versions) == [1, 2]
        shutil.rmtree(repo / "echo" / "1")
        wait_for(lambda: list(client.get_model("echo").versions) == [2])
        assert client.step(pinned.session_id, [1.0]).shape == (1, 2)  # still served
        with pytest.raises(RnnServeError) as err:
            client.open_session("echo", version=1)
        assert err.value.code.name == "NOT_FOUND"
        shutil.copytree(v2, repo / "echo" / "1")  # back while it retires: served again
        (repo / "echo" / "1" / "model.json").write_text(
            text.replace('"version": 2', '"version": 1')
        )
        wait_for(lambda: list(client.get_model("echo").versions) == [1, 2])
        client.close_session(client.open_session("echo", version=1).session_id)
        shutil.rmtree(repo / "echo" / "1")
        wait_for(lambda: list(client.get_model("echo").versions) == [2])
        client.close_session(pinned.session_id)
        unloads = srv.server.engine.metrics.registry.get_sample_value
        wait_for(
            lambda: (
                unloads(
                    "rnnserve_model_events_total",
                    {"model": "echo", "version": "1", "event": "unload"},
                )
                == 1
            )
        )


def test_broken_model_is_skipped_not_fatal(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXPORTED / "echo", repo / "echo")
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not onnx")
    shutil.copy(EXPORTED / "echo" / "1" / "model.json", broken / "model.json")
    with running(repository=repo) as srv, srv.client() as client:
        assert [m.name for m in client.list_models()] == ["echo"]


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RNNSERVE_GRPC_PORT": "0",
        "RNNSERVE_METRICS_PORT": "-1",
        "RNNSERVE_WORKERS": "1",
        "RNNSERVE_SHUTDOWN_GRACE": "5",
        "PYTHONUNBUFFERED": "1",
    }
    port_file = tmp_path / "log"
    with open(port_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rnnserve", "serve", "--repository", str(EXPORTED)],
            cwd=ROOT,
            env=env,
            stderr=log,
        )
    try:
        wait_for(lambda: "serving" in port_file.read_text())
        line = next(ln for ln in port_file.read_text().splitlines() if "serving" in ln)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        with (
            Client(f"127.0.0.1:{port}") as client,
            client.stream("echo") as stream,
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stream.step([1.0])
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="echo")
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(RnnServeError) as err:
                stream.step([1.0])
            assert err.value.code.name == "UNAVAILABLE"
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    assert '"stopped"' in port_file.read_text()


def test_a_cancelled_drain_reports_its_sessions_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The drain parks sessions in the store; cancelled while it waits for the store, it used to
    be swallowed and the process exited 0 with the session gone."""
    with running(state_store=redis_url) as srv:
        with srv.client() as client:
            client.open_session("echo")

            async def cancelled() -> int:
                drain = asyncio.ensure_future(srv.server.drain())
                while not srv.server.stopping:
                    await asyncio.sleep(0)
                drain.cancel()
                return await drain

            assert srv.call(cancelled()) == 1
        srv.server.stopping = False  # the process would end here; let running() stop it all
    assert "cancelled before it ended: up to 1 sessions" in caplog.text


def test_tls(tmp_path: Path) -> None:
    self_signed(tmp_path, "localhost")
    with running(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")) as srv:
        address = f"localhost:{srv.server.port}"
        with Client(address, tls_ca=tmp_path / "cert.pem") as secure:
            assert secure.predict("echo", np.ones((1, 4, 1))).y.shape == (1, 4, 2)
        probe = subprocess.run(
            [sys.executable, "-m", "rnnserve", "health", "--address", address],
            env={**os.environ, "RNNSERVE_TLS_CA": str(tmp_path / "cert.pem")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 0 and "SERVING" in probe.stdout
        # The container's probe: only the server's own settings, no address, no CA.
        beside = subprocess.run(
            [sys.executable, "-m", "rnnserve", "health"],
            env={
                **os.environ,
                "RNNSERVE_GRPC_PORT": str(srv.server.port),
                "RNNSERVE_TLS_CERT": str(tmp_path / "cert.pem"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert beside.returncode == 0 and "SERVING" in beside.stdout, beside.stderr
        plaintext = subprocess.run(
            [sys.executable, "-m", "rnnserve", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plaintext.returncode == 1
        with Client(address, timeout=2) as plain:
            with pytest.raises(RnnServeError) as err:
                plain.list_models()
            assert err.value.code.name == "UNAVAILABLE"


def test_every_flag_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("RNNSERVE_MAX_SESSIONS", "7")
    monkeypatch.setenv("RNNSERVE_MODELS", "echo,digits")
    monkeypatch.setenv("RNNSERVE_SESSION_IDLE_TIMEOUT", "2.5")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_namespace(parser.parse_args(["--grpc-port", "9"]))
    assert config == ServerConfig(
        max_sessions=7, models=("echo", "digits"), session_idle_timeout=2.5, grpc_port=9
    )
    with pytest.raises(ValueError):
        from_namespace(parser.parse_args(["--max-batch-size", "0"]))
    assert "RNNSERVE_MAX_BATCH_DELAY" in parser.format_help()


def test_bad_flag_values_name_the_reason(capsys: pytest.CaptureFixture) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_namespace(parser.parse_args(["--memory-budget", "1G"])).memory_budget == 2**30
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-budget", "lots"])
    assert "'lots' is not a size such as 512M or 1G" in capsys.readouterr().err
    with pytest.raises(
        ValueError,
        match=r"--inline-run-us \(RNNSERVE_INLINE_RUN_US\) must be "
        "at least 0; got -1",
    ):
        from_namespace(parser.parse_args(["--inline-run-us", "-1"]))
    assert from_namespace(parser.parse_args(["--inline-run-us", "0"])).inline_run_us == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_scans_the_repository_and_serves_on(workers: str, tmp_path: Path) -> None:
    """A hang-up signal (a terminal closing, an operator's `kill -HUP`) loads what was added
    to the repository, in every worker, instead of ending the server with no drain."""
    from bench.cluster import ServerProcess

    repo = tmp_path / "repo"
    shutil.copytree(EXPORTED / "echo", repo / "echo")
    server = ServerProcess(tmp_path / "log", "--workers", workers, "--repository", str(repo))
    try:
        shutil.copytree(EXPORTED / "digits", repo / "digits")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: server.log.read_text().count("loaded digits v1") == int(workers))
        for _ in range(4):  # new connections: every worker has it
            with Client(server.address) as client:
                assert [m.name for m in client.list_models()] == ["digits", "echo"]
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_ctrl_c_ends_a_client_command_without_a_traceback(server) -> None:
    stream = subprocess.Popen(
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
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stream.stdin.write("1\n")
    stream.stdin.flush()
    assert stream.stdout.readline().strip()  # the first output: the stream is open
    stream.send_signal(signal.SIGINT)
    out, err = stream.communicate(timeout=30)
    assert stream.returncode == 130 and "Traceback" not in err, err


def test_background_work_that_fails_or_ends_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The server's background work (idle sweep, repository poll, release listener) is tracked:
    a failure is logged with its traceback, an end of lasting work too, and one-off work (a
    SIGHUP's rescan) leaves the list once done."""

    async def fails() -> None:
        raise RuntimeError("broken on purpose")

    async def ends() -> None:
        return None

    with running() as srv:
        before = len(srv.server.tasks)

        async def start() -> int:
            srv.server.background(fails(), "failing work")
            srv.server.background(ends(), "lasting work")
            srv.server.background(ends(), "one-off work", lasting=False)
            await asyncio.sleep(0.05)
            return len(srv.server.tasks)

        assert srv.call(start()) == before + 2  # the one-off work is gone from the list
    assert "failing work failed and stopped: broken on purpose" in caplog.text
    assert "lasting work ended while the server serves" in caplog.text
    assert "one-off work" not in caplog.text
