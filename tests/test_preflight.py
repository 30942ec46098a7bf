"""`rnnserve serve` refuses a configuration it cannot serve with one line naming the flag, exit
status 2, before any worker starts: in a container, that line is all the log says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import EXPORTED, ROOT


def serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "serve",
            "--workers",
            "2",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


CASES = {
    "missing TLS certificate": (
        lambda tmp: ("--tls-cert", str(tmp / "none.pem"), "--tls-key", str(tmp / "none.key")),
        "--tls-cert {tmp}/none.pem: cannot read it (No such file",
    ),
    "missing tokens file": (
        lambda tmp: ("--auth-tokens-file", str(tmp / "tokens")),
        "--auth-tokens-file {tmp}/tokens: cannot read it",
    ),
    "missing model volume": (
        lambda tmp: ("--repository", str(tmp / "models")),
        "--repository {tmp}/models is not a directory",
    ),
    "empty model volume": (
        lambda tmp: ("--repository", str(tmp)),
        "--repository {tmp} holds no servable model",
    ),
    "no such model": (
        lambda tmp: ("--models", "echo,nosuch"),
        "--models names nosuch, which --repository exported does not hold (it "
        "holds binary_add, digits, echo, forecast)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_one_line_and_exit_status_2(case: str, tmp_path: Path) -> None:
    flags, expected = CASES[case]
    failed = serve(*flags(tmp_path))
    assert failed.returncode == 2
    (line,) = failed.stderr.splitlines()
    assert line.startswith("error: " + expected.format(tmp=tmp_path)), line


@pytest.mark.skipif(os.getuid() != 0, reason="runs the server as another user (needs root)")
def test_a_repository_the_server_user_cannot_read() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as place:  # /tmp: every user can reach it
        Path(place).chmod(0o755)
        repository = Path(place) / "locked"
        shutil.copytree(EXPORTED / "echo", repository / "echo")
        repository.chmod(0)
        failed = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "10001",
                "--regid",
                "10001",
                "--clear-groups",
                sys.executable,
                "-m",
                "rnnserve",
                "serve",
                "--repository",
                str(repository),
                "--grpc-port",
                "0",
                "--metrics-port",
                "-1",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        repository.chmod(0o755)
    assert failed.returncode == 2
    (line,) = failed.stderr.splitlines()
    assert f"--repository {repository}: cannot read it as uid 10001 (Permission denied)" in line
