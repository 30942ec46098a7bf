"""The Prometheus rules and the Grafana dashboard in deploy/, for real: promtool checks the rules
and runs their unit tests; a real Prometheus (Debian's) scrapes a running two-worker server
under traffic, evaluates the rules, and answers every query of the dashboard with data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.cluster import ServerProcess, free_port
from rnnserve.client import Client, RnnServeError
from tests.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "rnnserve.json"
RECORDED = "rnnserve:server_error_ratio:rate5m"
"""A recording rule's output: data once Prometheus has evaluated the rules on a few scrapes."""

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="prometheus not installed (.ci/run installs Debian's prometheus)",
)


@needs_prometheus
def test_rules_pass_promtool_and_their_unit_tests() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", "rnnserve.rules.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", "rnnserve.rules.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's variables as a user would have
    them: the job, and a rate window that holds a few of this test's 1 s scrapes."""
    board = json.loads(DASHBOARD.read_text())
    return [
        (
            panel["title"],
            target["expr"].replace("$job", "rnnserve").replace("$__rate_interval", "30s"),
        )
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def traffic(address: str) -> None:
    """Every kind of work the dashboard shows: Predicts, sessions stepped through new
    connections (so they move between the workers), a call that fails, sessions left to be
    evicted."""
    x = np.ones((2, 3, 1), np.float32)
    sessions = []
    with Client(address) as client:
        client.predict("echo", x)
        sessions = [client.open_session("echo").session_id for _ in range(4)]
    for _ in range(3):
        for session in sessions:
            with Client(address) as client:
                client.step(session, [1.0])
    with Client(address) as client, pytest.raises(RnnServeError):
        client.open_session("no-such-model")


@needs_prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path / "server.log", "--workers", "2", "--session-idle-timeout", "1", metrics=True
    )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES / "rnnserve.rules.yml")],
                "scrape_configs": [
                    {
                        "job_name": "rnnserve",
                        "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    with open(tmp_path / "prometheus.log", "w") as log:
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        traffic(server.address)
        deadline = time.monotonic() + 60
        while True:
            try:
                empty = [
                    (title, expr)
                    for title, expr in [*dashboard_queries(), ("a recording rule", RECORDED)]
                    if not query(port, expr)
                ]
            except OSError:  # Prometheus still starting
                empty = ["not answering"]
            if not empty:
                break
            assert time.monotonic() < deadline, f"queries without data: {empty}"
            time.sleep(1)
        assert query(port, 'up{job="rnnserve"}')[0]["value"][1] == "1"
        while True:  # each group evaluated at least once, every rule without error
            rules = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read()
            )["data"]["groups"]
            assert {g["name"] for g in rules} == {"rnnserve.recording", "rnnserve.alerts"}
            health = {r["health"] for g in rules for r in g["rules"]}
            if health == {"ok"}:
                break
            assert "err" not in health and time.monotonic() < deadline, rules
            time.sleep(0.5)
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        server.stop()
