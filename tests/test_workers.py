"""`rnnserve serve --workers 2`: one port, two worker processes, one supervisor, for real.

Every call below opens a new connection, so the kernel (SO_REUSEPORT) picks a worker for each:
sessions and v2 sequences must continue exactly wherever their calls land.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import ServerProcess, free_port
from rnnserve.client import Client, RnnServeError, new_session_id
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc
from rnnserve.ops.config import ServerConfig
from tests.conftest import ROOT

WORKERS = 2


class Workers(ServerProcess):
    """The supervised server (ServerProcess waits until every worker serves)."""

    http_port: int
    """Its KServe v2 HTTP/REST port, shared by the workers like the gRPC port."""

    def __init__(self, log: Path, *flags: str) -> None:
        super().__init__(log, "--workers", str(WORKERS), *flags, metrics=True)

    def worker_pids(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", "spawn_main"], capture_output=True, text=True
        ).stdout.split()
        return [int(pid) for pid in found]

    def scrape(self) -> dict[str, float]:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    def messages(self) -> list[str]:
        return [
            json.loads(line)["message"]
            for line in self.log.read_text().splitlines()
            if line.startswith("{")
        ]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    http_port = free_port()
    server = Workers(tmp_path / "log", "--http-port", str(http_port))
    server.http_port = http_port
    try:
        yield server
    finally:
        server.stop()


def fresh(server: Workers) -> Client:
    """A client on a connection of its own: the kernel picks the worker."""
    return Client(server.address)


def test_sessions_continue_exactly_on_whichever_worker_gets_the_call(workers: Workers) -> None:
    rng = np.random.default_rng(1)
    xs = rng.integers(0, 2, (6, 24, 2)).astype(np.float32)
    with fresh(workers) as client:
        expected = client.predict("binary_add", xs).y

    def drive(row: int) -> np.ndarray:
        with fresh(workers) as client:
            session = client.open_session("binary_add").session_id
        outputs = []
        for t in range(xs.shape[1]):
            with fresh(workers) as client:
                outputs.append(client.step(session, xs[row, t : t + 1]))
        with fresh(workers) as client, client.stream(resume=session) as stream:
            assert stream.session.steps == xs.shape[1]
        return np.concatenate(outputs)

    with ThreadPoolExecutor(len(xs)) as pool:  # many clients at once
        got = list(pool.map(drive, range(len(xs))))
    assert np.max(np.abs(np.stack(got) - expected)) <= 1e-5
    metrics = workers.scrape()
    assert metrics["rnnserve_session_handoffs_total"] >= 10, "calls really moved sessions"
    assert metrics["rnnserve_sessions"] == 0  # every stream block closed its session
    assert metrics["rnnserve_workers"] == WORKERS


def test_v2_sequences_continue_across_workers_and_doors(workers: Workers) -> None:
    """--http-port is shared by the workers as the gRPC port is: each step of one sequence
    comes on a new connection, over gRPC or HTTP, and lands on whichever worker the kernel
    picks; the outputs are the whole sequence's."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    httpclient = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(2).uniform(320, 370, (1, 12, 1)).astype(np.float32)
    outputs = []
    for t in range(x.shape[1]):
        module = httpclient if t % 3 == 1 else grpcclient
        triton = module.InferenceServerClient(
            f"127.0.0.1:{workers.http_port}" if module is httpclient else workers.address
        )
        tensor = module.InferInput("x", [1, 1, 1], "FP32")
        tensor.set_data_from_numpy(x[:, t : t + 1])
        outputs.append(
            triton.infer(
                "forecast",
                [tensor],
                sequence_id="moving-seq",
                sequence_start=t == 0,
                sequence_end=t == x.shape[1] - 1,
            ).as_numpy("y")
        )
        triton.close()
    with fresh(workers) as client:
        whole = client.predict("forecast", x).y
    assert np.max(np.abs(np.concatenate(outputs, axis=1) - whole)) <= 1e-5
    assert sum("HTTP on :" in m for m in workers.messages()) == WORKERS


def test_metrics_are_one_sum_over_the_workers(workers: Workers) -> None:
    opened = []
    for _ in range(12):
        with fresh(workers) as client:
            opened.append(client.open_session("echo").session_id)
    metrics = workers.scrape()
    assert metrics["rnnserve_sessions"] == 12
    assert metrics["rnnserve_requests_total"] >= 12
    per_worker = [
        line
        for line in urllib.request.urlopen(
            f"http://127.0.0.1:{workers.metrics_port}/metrics", timeout=5
        )
        .read()
        .decode()
        .splitlines()
        if line.startswith("rnnserve_worker_cpu_seconds_total")
    ]
    assert len(per_worker) == WORKERS


def test_a_killed_worker_is_replaced_and_the_server_stays_serving(workers: Workers) -> None:
    """Connections the killed worker held (or had queued) are reset, as with any process
    that dies; a probe that reconnects (wait_for_ready) always finds a serving worker."""
    victim = workers.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with grpc.insecure_channel(workers.address) as channel:
            statuses.append(
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                .status
            )
        pids = workers.worker_pids()
        if (
            len(pids) == WORKERS
            and victim not in pids
            and workers.scrape().get("rnnserve_workers") == WORKERS
        ):
            break
        time.sleep(0.05)
    assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
    assert victim not in workers.worker_pids() and len(workers.worker_pids()) == WORKERS
    assert workers.scrape()["rnnserve_worker_restarts_total"] == 1
    assert any("died (signal SIGKILL)" in m for m in workers.messages())
    with fresh(workers) as client:
        assert client.predict("echo", np.ones((1, 3, 1))).y.shape == (1, 3, 2)


def test_sigterm_drains_every_worker(workers: Workers) -> None:
    with fresh(workers) as client, client.stream("echo") as stream:
        stream.step([1.0])
        workers.proc.send_signal(signal.SIGTERM)
        assert workers.proc.wait(60) == 0
    messages = workers.messages()
    assert messages.count("stopped") == WORKERS
    assert any(m.startswith("stopped (2 workers") for m in messages)
    assert not workers.worker_pids()


def test_a_port_held_by_workers_refuses_another_server(workers: Workers) -> None:
    for count in ("1", "2"):
        other = subprocess.run(
            [
                sys.executable,
                "-m",
                "rnnserve",
                "serve",
                "--workers",
                count,
                "--grpc-port",
                str(workers.port),
                "--metrics-port",
                "-1",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 2, other.stderr
        assert f"--grpc-port {workers.port}" in other.stderr


def test_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    from rnnserve.ops.config import worker_count
    from rnnserve.ops.cpus import available_cpus, quota_cpus

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert quota_cpus(tmp_path) == 2  # 1.5 CPUs round up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(v1) == 1
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    assert worker_count(ServerConfig(workers="auto")) == available_cpus()
    assert worker_count(ServerConfig(workers="3")) == 3


def test_a_client_with_several_connections_keeps_each_session_on_one(workers: Workers) -> None:
    xs = np.random.default_rng(3).integers(0, 2, (12, 10, 1)).astype(np.float32)
    with Client(workers.address, connections=4) as client:
        assert len({id(c) for c in client.connections.channels}) == 4
        sessions = [client.open_session("echo").session_id for _ in xs]
        got = np.stack(
            [
                np.concatenate([client.step(s, x[t : t + 1]) for t in range(len(x))])
                for s, x in zip(sessions, xs)
            ]
        )
        assert np.max(np.abs(got - client.predict("echo", xs).y)) <= 1e-5
    assert workers.scrape().get("rnnserve_session_handoffs_total", 0) == 0  # none moved


def test_workers_do_not_outlive_a_killed_supervisor(workers: Workers) -> None:
    pids = workers.worker_pids()
    workers.proc.kill()
    workers.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, "orphaned workers still hold the port"
        time.sleep(0.1)


def serve_once(*flags: str) -> subprocess.CompletedProcess:
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
        timeout=120,
    )


def test_a_missing_repository_stops_the_server_with_one_line_before_any_worker(
    tmp_path: Path,
) -> None:
    failed = serve_once("--repository", str(tmp_path / "missing"))
    assert failed.returncode == 2
    (line,) = failed.stderr.splitlines()
    assert line.startswith(f"error: --repository {tmp_path / 'missing'} is not a directory")


def test_a_repository_no_worker_can_load_stops_the_server_with_its_reason(tmp_path: Path) -> None:
    version = tmp_path / "repo" / "echo" / "1"
    shutil.copytree(ROOT / "exported" / "echo" / "1", version)
    (version / "model.onnx").write_bytes(b"not a graph")  # found on disk, fails to load
    failed = serve_once("--repository", str(tmp_path / "repo"))
    assert failed.returncode == 2
    messages = [json.loads(line)["message"] for line in failed.stderr.splitlines()]
    assert any("no loadable model" in m for m in messages)
    assert any("could not start" in m for m in messages)


def test_a_stop_during_a_restart_back_off_starts_no_new_worker(tmp_path: Path) -> None:
    """A worker that dies before it is ready is started again after a back-off; SIGTERM in
    that pause must stop the server then, not start a worker that nobody tells to drain."""
    server = Workers(tmp_path / "log")
    try:
        before = set(server.worker_pids())
        os.kill(min(before), signal.SIGKILL)  # was ready: started again at once
        deadline = time.monotonic() + 30
        while not (fresh_pids := set(server.worker_pids()) - before):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(fresh_pids.pop(), signal.SIGKILL)  # dies before it is ready: a back-off
        while "starting it again in" not in server.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
    finally:
        server.kill()
    assert ": serving" not in server.log.read_text().split("starting it again in")[-1]


def test_a_dead_worker_is_reported_once_not_per_lookup(workers: Workers) -> None:
    """While a killed worker restarts, every lookup of a session it may hold fails to reach
    it; that is said once per worker, not once per lookup."""
    os.kill(max(workers.worker_pids()), signal.SIGKILL)
    missing = "0" * 32
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        with fresh(workers) as client:
            with pytest.raises(RnnServeError):
                client.step(missing, [1.0])
    lines = [m for m in workers.messages() if "did not answer a session lookup" in m]
    assert 1 <= len(lines) <= 2, lines  # one per worker at most (the restarted one may miss)


def test_the_workers_sockets_answer_only_their_siblings(workers: Workers) -> None:
    """Another process of the same user can reach the sockets; without the supervisor's key it
    can neither take a session nor read its state."""
    import glob

    from rnnserve.generated.rnnserve.internal.v1 import siblings_pb2 as pb
    from rnnserve.generated.rnnserve.internal.v1 import siblings_pb2_grpc as rpc

    with fresh(workers) as client:
        mine = client.open_session("echo").session_id
        client.step(mine, [1.0])
    sockets = sorted(
        glob.glob(f"{tempfile.gettempdir()}/rnnserve-*/worker-*.sock"), key=os.path.getmtime
    )[-WORKERS:]
    assert len(sockets) == WORKERS
    for path in sockets:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = rpc.SiblingsStub(channel)
            for metadata in ((), (("x-rnnserve-sibling-key", "guess"),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Release(
                        pb.ReleaseRequest(session_ids=[mine]), metadata=metadata, timeout=10
                    )
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with fresh(workers) as client:  # still there, still exact
        assert client.step(mine, [1.0]).shape == (1, 2)


def test_sessions_stepped_through_three_workers_at_once_are_never_lost_to_a_move(
    tmp_path: Path,
) -> None:
    """Six clients step the same two sessions, each call on a connection the kernel gives to
    any of three workers, so the sessions move all the time. A call that meets its session
    busy elsewhere or on its way waits for it (at worst UNAVAILABLE with a retry delay): it is
    never told the session is unknown or ended (19 % were), and every step that was answered
    was applied exactly once."""
    server = ServerProcess(tmp_path / "log", "--workers", "3", metrics=True)
    try:
        with Client(server.address) as client:
            ids = [client.open_session("echo").session_id for _ in range(2)]
        outcomes: list[tuple[int, str]] = []

        def drive(k: int) -> None:
            clients = [Client(server.address) for _ in range(3)]
            try:
                for n in range(60):
                    try:
                        clients[n % 3].step(ids[(n + k) % 2], [1.0])
                        outcomes.append(((n + k) % 2, "OK"))
                    except RnnServeError as exc:
                        outcomes.append(((n + k) % 2, exc.code.name))
            finally:
                for client in clients:
                    client.close()

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(drive, range(6)))
        codes = Counter(code for _, code in outcomes)
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert codes["UNAVAILABLE"] <= len(outcomes) // 20, codes
        with Client(server.address) as client, client.stream() as stream:
            for row, session_id in enumerate(ids):
                answered = sum(1 for r, code in outcomes if r == row and code == "OK")
                assert stream.resume(session_id).steps == answered
    finally:
        server.stop()


def test_a_caller_that_gives_up_mid_move_loses_no_session(workers: Workers) -> None:
    """Calls with millisecond deadlines on connections the kernel spreads over both workers:
    a session already taken from its sibling is restored even when its caller has gone (one
    was lost in about 20 such calls, and NOT_FOUND followed)."""
    with fresh(workers) as client:
        session_id = client.open_session("echo").session_id
    codes: Counter = Counter()
    for n in range(200):
        with Client(workers.address, timeout=(0.0005, 0.001, 0.002, 0.003)[n % 4]) as client:
            try:
                client.step(session_id, [1.0])
                codes["OK"] += 1
            except RnnServeError as exc:
                codes[exc.code.name] += 1
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    with fresh(workers) as client, client.stream() as stream:
        steps = stream.resume(session_id).steps  # still there
    assert codes["OK"] <= steps <= sum(codes.values())


def test_one_chosen_id_is_one_session_whichever_workers_its_opens_reach(tmp_path: Path) -> None:
    """Opened through two workers at once, one id gave two sessions that then diverged: 16
    connections, ready beforehand, open the same id at the same moment."""
    server = Workers(tmp_path / "log")
    channels = [
        grpc.insecure_channel(server.address, [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]  # a connection each
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        stubs = [rnnserve_pb2_grpc.InferenceStub(channel) for channel in channels]
        with ThreadPoolExecutor(16) as pool:
            for _ in range(10):
                chosen = new_session_id()
                together = threading.Barrier(16)

                def open_(stub, chosen=chosen, together=together) -> str:
                    together.wait()
                    try:
                        stub.OpenSession(
                            rnnserve_pb2.OpenSessionRequest(model="echo", session_id=chosen),
                            timeout=10,
                        )
                        return "OK"
                    except grpc.RpcError as exc:
                        return exc.code().name

                answers = Counter(pool.map(open_, stubs))
                assert answers == {"OK": 1, "ALREADY_EXISTS": 15}
        assert server.scrape()["rnnserve_sessions"] == 10
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def test_the_per_client_cap_counts_the_whole_server(tmp_path: Path) -> None:
    """With 2 workers, a client capped at 5 held 10; a dead worker's sessions free the cap,
    and a call for one of them is told it was lost (it was told "no session … on this
    server")."""
    server = Workers(tmp_path / "log", "--max-sessions-per-client", "5")
    opened: list[str] = []
    try:

        def attempt(_: int) -> str:
            with fresh(server) as client:
                try:
                    opened.append(client.open_session("echo").session_id)
                    return "OK"
                except RnnServeError as exc:
                    return exc.code.name

        with ThreadPoolExecutor(8) as pool:
            answers = Counter(pool.map(attempt, range(24)))
        assert answers == {"OK": 5, "RESOURCE_EXHAUSTED": 19}
        victims = server.worker_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # both replaced, and both of the new ones serving
            pids = server.worker_pids()
            if (
                len(pids) == WORKERS
                and not set(pids) & set(victims)
                and server.scrape().get("rnnserve_workers") == WORKERS
            ):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        lost = [m for m in server.messages() if "died holding" in m]
        assert sum(int(m.split("holding ")[1].split()[0]) for m in lost) == 5
        assert server.scrape()["rnnserve_worker_sessions_lost_total"] == 5
        for session_id in opened:
            with fresh(server) as client, pytest.raises(RnnServeError) as told:
                client.step(session_id, [1.0])
            assert told.value.code.name == "FAILED_PRECONDITION"
            assert "lost when the worker process holding it died" in str(told.value)
        with ThreadPoolExecutor(8) as pool:
            answers = Counter(pool.map(attempt, range(8)))
        assert answers == {"OK": 5, "RESOURCE_EXHAUSTED": 3}
    finally:
        server.stop()


def test_a_session_let_go_to_a_sibling_that_never_took_it_is_live_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Moves are two-phase: the holder keeps the session's slot until the shared table names
    the worker it went to. Here the sibling's answer is lost (the holder releases, nobody
    restores): it was lost for good; now, once the sibling's call is surely over, it is live
    on the holder again and continues exactly. Two real workers in this process."""
    from bench.cluster import free_port
    from rnnserve.engine import moves
    from rnnserve.state import claims
    from rnnserve.supervisor import WorkerPlace
    from tests.conftest import RunningServer, make_config

    monkeypatch.setattr(moves, "LEND_TIMEOUT", 0.2)
    claims.create(tmp_path)
    config = make_config(grpc_port=free_port())
    holder, sibling = (
        RunningServer(config, worker=WorkerPlace(i, 2, tmp_path, os.getpid(), "key"))
        for i in range(2)
    )
    try:
        x = np.array([[[1.0], [0.0], [1.0]]], np.float32)
        holder_engine = holder.server.engine
        opened = holder.call(holder_engine.open_session("echo", 0, {}))
        first = holder.call(holder_engine.step([opened.session_id], x[:, :2]))
        moved, _, _ = holder.call(holder_engine.moves.release_sessions([opened.session_id], ""))
        assert [p.session_id for p in moved] == [opened.session_id]  # ...and the answer is lost
        time.sleep(0.3)
        holder.sweep()
        assert "let go to a sibling that never took it" in caplog.text
        # the sibling's answer, late after all: the holder took the session back, so the
        # sibling must not keep its copy (exactly one of the two wins the shared row)
        sibling_engine = sibling.server.engine
        assert not sibling.call(_async(sibling_engine.moves.restore, moved[0], "moved"))
        assert sibling_engine.live_sessions == 0 and holder_engine.live_sessions == 1
        second = holder.call(holder_engine.step([opened.session_id], x[:, 2:]))
        assert not second.errors and second.steps == [3]
        whole = holder.call(holder_engine.predict("echo", 0, x, [3], {}, False))
        np.testing.assert_array_equal(np.concatenate([first.y, second.y], axis=1), whole.y)
    finally:
        sibling.stop()
        holder.stop()


async def _async(function, *args):
    return function(*args)
