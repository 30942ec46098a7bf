"""Failures and cancellations on cue: a runner that fails or stalls the runs a test marks.

A run whose x holds FAIL raises; one whose x holds STALL waits in its thread until the test
releases it. Nothing here depends on timing: what must happen while a run is stalled happens
while the test holds it.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import Client, RnnServeError
from rnnserve.models.runner import Buffers, OrtRunner
from tests.conftest import EXPORTED, RunningServer, running
from tests.test_lifecycle import wait_for

FAIL = 13.0
STALL = 17.0


def faulty_runner() -> type[OrtRunner]:
    """An OrtRunner class with its own cues, so tests do not share them."""

    class FaultyRunner(OrtRunner):
        stalled = threading.Event()
        release = threading.Event()
        hold_loading: set[str] = set()
        """Model names whose load waits until `release` (it looks like a slow load)."""

        def __init__(self, spec, directory, *args) -> None:
            if spec.name in FaultyRunner.hold_loading:
                FaultyRunner.stalled.set()
                assert FaultyRunner.release.wait(60), "the test never released the load"
            super().__init__(spec, directory, *args)

        def _cue(self, x: np.ndarray) -> None:
            if (x == FAIL).any():
                raise RuntimeError("injected fault")
            if (x == STALL).any():
                FaultyRunner.stalled.set()
                assert FaultyRunner.release.wait(60), "the test never released the run"

        def run(self, x: np.ndarray, states: list[np.ndarray]):
            self._cue(x)
            return super().run(x, states)

        def run_bound(self, buffers: Buffers) -> None:
            self._cue(buffers.x)
            super().run_bound(buffers)

    return FaultyRunner


def two_echo_versions(tmp_path: Path) -> Path:
    """echo v1 and v2 (same weights): sessions pinned to each run in separate batchers."""
    repo = tmp_path / "repo"
    shutil.copytree(EXPORTED / "echo" / "1", repo / "echo" / "1")
    shutil.copytree(EXPORTED / "echo" / "1", repo / "echo" / "2")
    spec = repo / "echo" / "2" / "model.json"
    spec.write_text(spec.read_text().replace('"version": 1', '"version": 2'))
    return repo


def serving(server: RunningServer) -> bool:
    return health(server, "") == health_pb2.HealthCheckResponse.SERVING


def bits(seed: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (steps, 1)).astype(np.float32)


@pytest.mark.parametrize("state", ["host", "device"])
def test_a_failing_run_fails_only_its_own_rows(tmp_path: Path, state: str) -> None:
    runner = faulty_runner()
    with (
        running(repository=two_echo_versions(tmp_path), runner=runner, session_state=state) as srv,
        srv.client() as client,
    ):
        v1 = client.open_session("echo", version=1).session_id
        v2 = client.open_session("echo", version=2).session_id
        client.step(v1, bits(0, 3))
        before = client.snapshot(v1)
        x = np.stack([np.full((4, 1), FAIL, np.float32), bits(1, 4)])
        batch = client.step_many([v1, v2], x)
        assert list(batch.errors) == [0] and batch.errors[0].code.name == "INTERNAL"
        assert "failed" in batch.errors[0].message and "injected" not in batch.errors[0].message
        assert np.isnan(batch.y[0]).all()
        assert np.array_equal(batch.y[1], client.predict("echo", x[1:], version=2).y[0])
        assert batch.steps == [0, 4]
        after = client.snapshot(v1)  # the failed run left the session as it was
        assert all(np.array_equal(before[k], after[k]) for k in before)
        with client.stream(resume=v1) as stream:  # its own session: the message fails whole
            with pytest.raises(RnnServeError) as err:
                stream.step([FAIL])
            assert err.value.code.name == "INTERNAL"
            assert stream.step([1.0]).shape == (1, 2)  # and the stream lives on
            assert stream.snapshot() and stream.session.steps == 3
        assert serving(srv)


@pytest.mark.parametrize("state", ["host", "device"])
def test_cancellation_while_a_run_is_in_a_thread(state: str) -> None:
    """A caller that gives up while its run is in a worker thread leaves its session exactly
    as it was, wherever its state lives; work queued behind the run is answered once it ends."""
    runner = faulty_runner()
    with (
        running(runner=runner, inline_run_us=0, session_state=state) as srv,
        srv.client() as client,
        Client(srv.address, timeout=2) as hurried,
        ThreadPoolExecutor(2) as pool,
    ):
        stalled = client.open_session("echo").session_id
        other = client.open_session("echo").session_id
        client.step(stalled, bits(2, 2))
        before = client.snapshot(stalled)
        gave_up = pool.submit(hurried.step, stalled, [STALL])
        assert runner.stalled.wait(30)
        queued = pool.submit(client.step, other, bits(3, 5))
        with pytest.raises(RnnServeError) as err:
            gave_up.result(30)  # its deadline passes while the run is held
        assert err.value.code.name == "DEADLINE_EXCEEDED"
        # The server learns of the deadline on its own clock: release the run only once it has
        # (a busy machine can otherwise finish the run first, and the step rightly counts).
        wait_for(lambda: srv.call(cancelled_handlers()) > 0)
        runner.release.set()
        assert np.array_equal(queued.result(30), client.predict("echo", bits(3, 5)[None]).y[0])
        after = client.snapshot(stalled)
        assert all(np.array_equal(before[k], after[k]) for k in before)
        rest = client.step(stalled, bits(4, 3))
        whole = client.predict("echo", np.concatenate([bits(2, 2), bits(4, 3)])[None]).y[0]
        assert np.max(np.abs(rest - whole[2:])) <= 1e-5  # as if the stalled step never ran
        assert serving(srv)


async def cancelled_handlers() -> int:
    """Tasks on the server's loop that were asked to stop and have not finished."""
    return sum(1 for task in asyncio.all_tasks() if task.cancelling())


def test_overlapping_multi_session_steps_run_concurrently() -> None:
    """Messages naming overlapping sets of sessions, in different orders, from many threads:
    none deadlocks, and every session ends exactly where its own steps take it."""
    rng = np.random.default_rng(7)
    with running() as srv, srv.client() as client:
        ids = [client.open_session("binary_add").session_id for _ in range(8)]
        plans = [list(rng.permutation(ids)[: rng.integers(2, 7)]) for _ in range(48)]
        ones = np.ones((8, 2, 2), np.float32)  # the same steps everywhere: order cannot matter

        def send(plan: list[str]) -> list[int]:
            with Client(srv.address) as own:
                batch = own.step_many(plan, ones[: len(plan)])
            assert not batch.errors, batch.errors
            return batch.steps

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, plans))
        for session_id in ids:
            count = sum(plan.count(session_id) for plan in plans) * 2
            expected = client.predict("binary_add", np.ones((1, count, 2), np.float32))
            state = client.snapshot(session_id)
            for name, value in expected.final_states.items():
                assert np.max(np.abs(state[name] - value[0])) <= 1e-5


def test_retiring_a_version_during_a_predict(tmp_path: Path) -> None:
    runner = faulty_runner()
    repo = two_echo_versions(tmp_path)
    x = np.concatenate([bits(5, 6), [[STALL]]])[None]
    with (
        running(repository=repo, runner=runner, inline_run_us=0) as srv,
        srv.client() as client,
        ThreadPoolExecutor(1) as pool,
    ):
        expected = client.predict("echo", np.where(x == STALL, 1.0, x), version=1)
        in_flight = pool.submit(client.predict, "echo", x, version=1)
        assert runner.stalled.wait(30)
        shutil.rmtree(repo / "echo" / "1")
        srv.call(srv.server.sync_models())  # v1 retires while its run is held
        with pytest.raises(RnnServeError) as err:
            client.predict("echo", x[:, :6], version=1)
        assert err.value.code.name == "NOT_FOUND"
        assert client.get_model("echo").version == 2
        runner.release.set()
        answer = in_flight.result(30)  # the run in flight still answers its caller
        assert answer.version == 1 and answer.y.shape == (1, 7, 2)
        assert np.array_equal(answer.y[0, :6], expected.y[0, :6])
        unloads = srv.server.engine.metrics.registry.get_sample_value(
            "rnnserve_model_events_total", {"model": "echo", "version": "1", "event": "unload"}
        )
        assert unloads == 1


def test_readiness_follows_a_slow_load(tmp_path: Path) -> None:
    """A version that is loading is listed, not ready, and answers UNAVAILABLE with a retry
    delay; health and the v2 readiness calls say the same, and all turn once it is loaded."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    runner = faulty_runner()
    runner.hold_loading = {"forecast"}
    repo = tmp_path / "repo"
    shutil.copytree(EXPORTED / "echo", repo / "echo")
    with running(repository=repo, runner=runner) as srv, srv.client() as client:
        triton = grpcclient.InferenceServerClient(srv.address)
        shutil.copytree(EXPORTED / "forecast", repo / "forecast")
        scan = asyncio.run_coroutine_threadsafe(srv.server.sync_models(), srv.loop)
        assert runner.stalled.wait(30)
        listed = {m.name: m.ready for m in client.list_models()}
        assert listed == {"echo": True, "forecast": False}
        with pytest.raises(RnnServeError) as err:
            client.predict("forecast", np.ones((1, 2, 1)))
        assert err.value.code.name == "UNAVAILABLE" and err.value.retry_after == 1.0
        assert health(srv, "forecast") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(srv, "") == health_pb2.HealthCheckResponse.SERVING  # echo serves
        assert triton.is_server_ready() and not triton.is_model_ready("forecast")
        index = {m.name: m.state for m in triton.get_model_repository_index().models}
        assert index == {"echo": "READY", "forecast": "LOADING"}
        runner.release.set()
        scan.result(60)
        assert health(srv, "forecast") == health_pb2.HealthCheckResponse.SERVING
        assert triton.is_model_ready("forecast")
        assert client.predict("forecast", np.ones((1, 2, 1))).y.shape == (1, 2, 1)
        triton.close()


def health(server: RunningServer, service: str) -> int:
    with grpc.insecure_channel(server.address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_a_ragged_predict_answers_only_once_every_length_group_has_run() -> None:
    """Sequences of each length run as a group of their own; when one group fails, the call
    (and the memory it holds) must wait for the others, which still run."""
    runner = faulty_runner()
    with running(runner=runner, inline_run_us=0) as srv, srv.client() as client:
        failing, stalling = np.full((3, 1), FAIL, np.float32), np.full((5, 1), STALL, np.float32)
        outcome: dict[str, RnnServeError] = {}

        def call() -> None:
            try:
                client.predict("echo", [failing, stalling])
            except RnnServeError as exc:
                outcome["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        assert runner.stalled.wait(30)
        caller.join(1.0)
        alive = caller.is_alive()
        runner.release.set()
        caller.join(30)
        assert alive, "answered while a group was still running"
        assert outcome["error"].code.name == "INTERNAL"
        wait_for(lambda: srv.server.engine.budget.used == 0)  # the call's memory came back
