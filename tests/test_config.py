"""Every flag and RNNSERVE_* value is checked in one place: a bad one stops `serve` with one
line naming the flag or the variable and exit status 2, and breaks no other command."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve import cli
from rnnserve.ops.config import ENV_PREFIX, ServerConfig, from_namespace, unknown_variables
from rnnserve.ops.cpus import available_cpus
from tests.conftest import ROOT

VARIABLES = {ENV_PREFIX + f.name.upper(): f for f in fields(ServerConfig)}
NUMBERS = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "abc", "1e-9", "inf", "-1", "nan", "70000", "1G", "0x10", " 5 ", "١٢"]),
)


def parse_serve(argv: list[str]) -> tuple[ServerConfig | None, str]:
    """What `rnnserve serve ARGS` makes of its flags and environment, without serving: the
    config, or the one line it stops with."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli.parser().parse_args(["serve", *argv])
        except SystemExit as stop:
            assert stop.code == 2
            return None, err.getvalue()
    try:
        return from_namespace(args), ""
    except ValueError as exc:
        return None, f"error: {exc}\n"


@settings(max_examples=300, deadline=None)
@given(variable=st.sampled_from(sorted(VARIABLES)), text=st.one_of(NUMBERS, st.text()))
def test_any_environment_value_gives_a_valid_config_or_one_line_naming_it(
    variable: str, text: str
) -> None:
    if "\x00" in text:
        return  # an environment cannot hold it
    with mock.patch.dict(os.environ, {variable: text}):
        config, error = parse_serve([])
    if config is None:
        assert error.count("\n") == 1, error
        flag = "--" + VARIABLES[variable].name.replace("_", "-")
        assert variable in error or flag in error, error
        return
    for f in fields(ServerConfig):  # accepted: every number finite and in its declared range
        value = getattr(config, f.name)
        if "minimum" in f.metadata and isinstance(value, int | float):
            assert f.metadata["minimum"] <= value <= f.metadata.get("maximum", value)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {"RNNSERVE_GRPC_PORT": "abc"}, "RNNSERVE_GRPC_PORT: 'abc' is not a whole number"),
        ([], {"RNNSERVE_DEVICE": "GPU"}, "RNNSERVE_DEVICE: 'GPU' is not one of auto, cpu, cuda"),
        ([], {"RNNSERVE_SHUTDOWN_GRACE": "nan"}, "RNNSERVE_SHUTDOWN_GRACE: 'nan' is not a finite"),
        (
            ["--grpc-port", "70000"],
            {},
            "--grpc-port (RNNSERVE_GRPC_PORT) must be between 0 and 65535; got 70000",
        ),
        (["--metrics-port", "84059"], {}, "--metrics-port (RNNSERVE_METRICS_PORT) must be between"),
        (["--log-level", "verbose"], {}, "argument --log-level: 'verbose' is not one of debug"),
        (["--session-idle-timeout", "1e-9"], {}, "must be at least 0.1; got 1e-09"),
        (["--repository-poll", "1e-9"], {}, "must be 0 or at least 0.05; got 1e-09"),
        (
            ["--shutdown-grace", "-1"],
            {},
            "--shutdown-grace (RNNSERVE_SHUTDOWN_GRACE) must be between 0 and 3600; got -1.0",
        ),
        (
            ["--workers", str(4 * available_cpus() + 1)],
            {},
            "--workers (RNNSERVE_WORKERS) must be auto or a number from 1",
        ),
        (["--max-message-bytes", "4G"], {}, "must be between 1 and 2147483647"),
        (
            ["--otlp-endpoint", "otel-collector:4317"],
            {},
            "--otlp-endpoint (RNNSERVE_OTLP_ENDPOINT) must be http://host:port (plaintext) or "
            "https://host:port (TLS); got 'otel-collector:4317'",
        ),
        ([], {"RNNSERVE_OTLP_ENDPOINT": "http://otel:99999"}, "must be http://host:port"),
        (
            ["--state-store", "/var/lib/sessions.db"],
            {},
            "--state-store (RNNSERVE_STATE_STORE) must start with redis://, rediss://, unix://, "
            "sqlite://; got '/var/lib/sessions.db'",
        ),
        (["--state-store", "sqlite:///var/lib/"], {}, "sqlite:// takes the database file's path"),
        (
            ["--session-ttl", "86400"],
            {},
            "--session-ttl (RNNSERVE_SESSION_TTL) keeps idle sessions in the state store: set "
            "--state-store (RNNSERVE_STATE_STORE) too",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line(
    argv: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config, error = parse_serve(argv)
    assert config is None and error.count("\n") == 1 and expected in error, error


def run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve", *argv],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_server_variable_breaks_no_other_command() -> None:
    version = run("--version", RNNSERVE_GRPC_PORT="abc", RNNSERVE_METRICS_PORT="x")
    assert version.returncode == 0 and version.stdout.startswith("rnnserve ")
    probe = run("health", "--address", "127.0.0.1:1", RNNSERVE_MAX_SESSIONS="many")
    assert probe.returncode == 1 and probe.stderr.startswith("unhealthy: UNAVAILABLE")
    beside = run("health", RNNSERVE_GRPC_PORT="abc")  # where a client command looks by default
    assert beside.returncode == 2 and beside.stderr.splitlines() == [
        "rnnserve: error: RNNSERVE_GRPC_PORT='abc' is no port (1-65535); give --address "
        "host:port (see rnnserve --help)"
    ]
    served = run("serve", RNNSERVE_DEVICE="GPU")
    assert served.returncode == 2
    assert served.stderr.splitlines() == [
        "rnnserve serve: error: argument --device: RNNSERVE_DEVICE: 'GPU' is not one of auto, "
        "cpu, cuda (see rnnserve serve --help)"
    ]


def test_unknown_variables_are_named() -> None:
    environ = {
        "RNNSERVE_GRPC_PORT": "1",
        "RNNSERVE_ADDRESS": "x",
        "RNNSERVE_GRCP_PORT": "1",
        "RNNSERVE_TIMEOUT": "3",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == ["RNNSERVE_GRCP_PORT", "RNNSERVE_TIMEOUT"]


def test_unknown_variables_warn_when_the_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.cluster import ServerProcess

    monkeypatch.setenv("RNNSERVE_GRCP_PORT", "9000")
    server = ServerProcess(tmp_path / "log")
    try:
        assert "RNNSERVE_GRCP_PORT is set, but no flag reads it" in server.log.read_text()
    finally:
        server.stop()
