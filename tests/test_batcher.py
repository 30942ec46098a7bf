"""The engine without gRPC: coalesced runs return exactly what separate runs return."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from rnnserve.engine.engine import Engine
from rnnserve.engine.registry import ModelRegistry
from rnnserve.engine.run_times import RunTimes
from rnnserve.engine.steps import StepMemo
from rnnserve.errors import InvalidArgument, Unavailable
from rnnserve.models.contract import read_spec
from rnnserve.models.runner import OrtRunner
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.metrics import Metrics
from rnnserve.state.memory import MemoryBudget
from rnnserve.state.sessions import SessionTable
from tests.conftest import EXPORTED


async def make_engine(**overrides) -> Engine:
    config = ServerConfig(repository=EXPORTED, **overrides)
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(config, metrics, ThreadPoolExecutor(2))
    engine = Engine(
        config,
        registry,
        SessionTable(config.max_sessions, 60, metrics),
        MemoryBudget(config.memory_budget),
    )
    await engine.sync_models()
    return engine


async def echo_model() -> tuple[ModelRegistry, Metrics]:
    """A registry of the shipped models, for tests of one model's batcher."""
    config = ServerConfig(repository=EXPORTED)
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(config, metrics, ThreadPoolExecutor(2))
    await registry.sync()
    return registry, metrics


async def arrive_after(turns: int) -> None:
    """Let other tasks run `turns` times first: a random arrival order without a clock."""
    for _ in range(turns):
        await asyncio.sleep(0)


def test_concurrent_sessions_coalesce_and_match_unbatched_runs() -> None:
    rng = np.random.default_rng(11)
    xs = rng.integers(0, 2, (40, 12, 2)).astype(np.float32)
    runner = OrtRunner(
        read_spec(EXPORTED / "binary_add" / "1"), EXPORTED / "binary_add" / "1", "cpu", 1
    )
    expected = [runner.run(x[None], [np.zeros((1, 20), np.float32)] * 4)[0][0] for x in xs]

    async def main() -> tuple[list[np.ndarray], float]:
        engine = await make_engine(max_batch_size=16, max_batch_delay=2000)
        sessions = [await engine.open_session("binary_add", 0, {}) for _ in xs]

        async def drive(i: int) -> np.ndarray:
            await arrive_after(int(rng.integers(0, 4)))
            outs = [
                (await engine.step([sessions[i].session_id], xs[i, t][None, None])).y[0]
                for t in range(xs.shape[1])
            ]
            return np.concatenate(outs)

        ys = await asyncio.gather(*(drive(i) for i in range(len(xs))))
        labels = {"model": "binary_add", "version": "1"}
        sample = engine.metrics.registry.get_sample_value
        mean_rows = sample("rnnserve_batch_size_sum", labels) / sample(
            "rnnserve_batch_size_count", labels
        )
        await engine.shutdown()
        return ys, mean_rows

    ys, mean_rows = asyncio.run(main())
    for got, want in zip(ys, expected):
        assert np.max(np.abs(got - want)) <= 1e-5  # every caller got its own rows back
    assert mean_rows > 1.5  # steps from different sessions really shared runs


def test_engine_validates_before_queueing() -> None:
    async def main() -> None:
        engine = await make_engine()
        try:
            await engine.predict("echo", 0, np.zeros((1, 2, 3), np.float32), [], {}, False)
        except InvalidArgument as exc:
            assert "[rows, timesteps, 1]" in str(exc)
        else:
            raise AssertionError("accepted 3 features for a 1-feature model")
        await engine.shutdown()

    asyncio.run(main())


def test_bound_buffers_give_exactly_what_a_plain_run_gives() -> None:
    directory = EXPORTED / "binary_add" / "1"
    runner = OrtRunner(read_spec(directory), directory, "cpu", 1)
    rng = np.random.default_rng(5)
    for rows, steps in [(1, 1), (3, 1), (1, 8), (64, 4), (1, 1)]:  # (1, 1) again: reused
        x = rng.integers(0, 2, (rows, steps, 2)).astype(np.float32)
        states = [rng.normal(size=(rows, 20)).astype(np.float32) for _ in range(4)]
        y, finals = runner.run(x, states)
        bound = runner.buffers(rows, steps)
        bound.x[...] = x
        for buffer, state in zip(bound.states, states):
            buffer[...] = state
        runner.run_bound(bound)
        assert np.array_equal(bound.y, y)
        assert all(np.array_equal(a, b) for a, b in zip(bound.finals, finals))
    assert runner.buffers(1024, 2) is None  # large runs allocate instead
    for rows in range(1, 40):
        runner.buffers(rows, 1)
    assert runner.buffers(1, 1) is not None  # the cache stays bounded and keeps working


def test_inline_threaded_and_unbatched_steps_agree() -> None:
    """The same steps through event-loop runs, executor-thread runs and one step per run."""
    rng = np.random.default_rng(3)
    xs = rng.integers(0, 2, (24, 6, 2)).astype(np.float32)

    async def run(**overrides) -> np.ndarray:
        engine = await make_engine(**overrides)
        sessions = [await engine.open_session("binary_add", 0, {}) for _ in xs]

        async def drive(i: int) -> np.ndarray:
            session = sessions[i].session_id
            return np.concatenate(
                [
                    (await engine.step([session], xs[i, t : t + 1][None])).y[0]
                    for t in range(xs.shape[1])
                ]
            )

        ys = np.stack(await asyncio.gather(*(drive(i) for i in range(len(xs)))))
        await engine.shutdown()
        return ys

    inline = asyncio.run(run())
    threaded = asyncio.run(run(inline_run_us=0))
    single = asyncio.run(run(max_batch_size=1))
    assert np.array_equal(inline, threaded)
    assert np.array_equal(inline, single)


def test_run_times_rate_unseen_sizes_from_smaller_ones_only() -> None:
    times = RunTimes()
    assert times.expect(1) is None
    times.measured(1, 15e-6)
    assert times.expect(1) == pytest.approx(15e-6)
    assert times.expect(1000) == pytest.approx(15e-3)  # one row's rate: an overrating
    times.measured(1000, 170e-6)
    assert times.expect(1000) == pytest.approx(170e-6)
    assert times.expect(600) == pytest.approx(170e-6 * 600 / 1000)  # 600 is in 1000's class
    assert times.expect(5000) == pytest.approx(170e-6 * 5)
    times.measured(1000, 1e-3)  # one slow run moves its class part of the way
    assert 170e-6 < times.expect(1000) < 1e-3
    assert times.expect(1) == pytest.approx(15e-6)


def test_runs_go_to_the_loop_once_measured_short() -> None:
    """A run expected (from the one-row run timed at load, or runs since) within
    --inline-run-us happens on the event loop, through the bound buffers; over it, or with
    --inline-run-us 0, in a thread."""

    async def where(inline_run_us: int, rows: list[int]) -> list[bool]:
        engine = await make_engine(inline_run_us=inline_run_us, models=("echo",))
        runner = engine._registry.get("echo").runner
        loop_thread, on_loop = threading.get_ident(), []
        run_bound, run = runner.run_bound, runner.run

        def watched(method):
            def call(*args):
                on_loop.append(threading.get_ident() == loop_thread)
                return method(*args)

            return call

        runner.run_bound, runner.run = watched(run_bound), watched(run)
        for n in rows:
            ids = [(await engine.open_session("echo", 0, {})).session_id for _ in range(n)]
            await engine.step(ids, np.ones((n, 1, 1), np.float32))
        await engine.shutdown()
        return on_loop

    assert asyncio.run(where(1_000_000, [1, 64, 8])) == [True, True, True]
    assert asyncio.run(where(0, [1, 1])) == [False, False]
    assert asyncio.run(where(1, [1, 1])) == [False, False]  # no echo run takes 1 µs


def test_cancelled_steps_leave_state_alone_and_close_fails_queued_work() -> None:
    async def main() -> None:
        registry, metrics = await echo_model()
        model = registry.get("echo")
        session = SessionTable(10, 60, metrics).open(model, None)
        x = np.ones((1, 1, 1), np.float32)
        before = model.store.read(session.slot)
        queued = asyncio.ensure_future(model.batcher.run(x, [session.slot]))
        await asyncio.sleep(0)  # queued, its flush not yet run
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert queued.cancelled()
        assert all(np.array_equal(a, b) for a, b in zip(before, model.store.read(session.slot)))
        await model.batcher.run(x, [session.slot])  # the batcher still works
        assert not np.array_equal(before[0], model.store.read(session.slot)[0])

        waiting = asyncio.ensure_future(model.batcher.run(x, [session.slot]))
        await asyncio.sleep(0)  # queued
        await model.batcher.close()
        try:
            await waiting
        except Unavailable as exc:
            assert "unloaded" in str(exc)
        else:
            raise AssertionError("queued work survived close()")
        try:
            await model.batcher.run(x, [session.slot])
        except Unavailable:
            pass
        else:
            raise AssertionError("a closed batcher took new work")
        await registry.close()

    asyncio.run(main())


def test_a_lone_step_runs_at_once_and_company_still_batches() -> None:
    """With nothing else ready on the loop, a step is answered before it would suspend (no
    flush callback, no wake-up); steps that arrive together still share one run."""

    async def main() -> None:
        registry, metrics = await echo_model()
        model = registry.get("echo")
        table = SessionTable(10, 60, metrics)
        slots = [table.open(model, None).slot for _ in range(4)]
        x = np.ones((1, 1, 1), np.float32)
        lone = model.batcher.run(x, slots[:1])
        with pytest.raises(StopIteration) as done:  # finished on its first resumption
            lone.send(None)
        assert done.value.value[0].shape == (1, 1, 2)  # y
        runs = metrics.registry.get_sample_value
        before = runs("rnnserve_batch_size_count", {"model": "echo", "version": "1"})
        await asyncio.gather(*(model.batcher.run(x, [s]) for s in slots))
        after = runs("rnnserve_batch_size_count", {"model": "echo", "version": "1"})
        assert after - before == 1  # four steps, one run
        await registry.close()

    asyncio.run(main())


def test_a_step_runs_at_once_only_when_nothing_holds_it_back() -> None:
    """The run-at-once path checks, without taking them, its sessions' locks and the memory it
    needs. A session held by other work (a message waiting for its other rows' locks, a move
    to a sibling worker) or a budget without room makes a step wait its turn, with the
    batcher idle and nothing else ready on the loop: native steps (with and without a
    stream's memo) and v2 sequence steps."""

    async def main() -> None:
        engine = await make_engine()
        loop = asyncio.get_running_loop()
        x = np.ones((1, 1, 1), np.float32)
        memo = StepMemo()
        native = (await engine.open_session("echo", 0, {})).session_id
        await engine.step([native], x, memo=memo)  # the memo keeps the session from here
        sequence = "7" * 32
        await engine.sequence_step("echo", 0, sequence, x, {}, True, False, False, "")
        steps = [
            lambda: engine.step([native], x),
            lambda: engine.step([native], x, memo=memo),
            lambda: engine.sequence_step("echo", 0, sequence, x, {}, False, False, False, ""),
        ]
        events: list[str] = []

        def later(what: str, free: Callable[[], None]) -> None:
            loop.call_later(0.02, lambda: (events.append(what), free()))  # a timer: not ready

        for session_id, step in zip([native, native, sequence], steps):
            with pytest.raises(StopIteration):  # free: done on its first resumption
                step().send(None)
            lock = engine._sessions.get(session_id).lock
            await lock.acquire()
            later("lock released", lock.release)
            await step()
            events.append("stepped")
            room = engine.budget.capacity - engine.budget.used  # a memo holds a few bytes
            assert engine.budget.hold(room)
            later("memory released", lambda room=room: engine.budget.release(room))
            await step()
            events.append("stepped")
        assert events == ["lock released", "stepped", "memory released", "stepped"] * 3
        await engine.shutdown()

    asyncio.run(main())


def test_an_error_while_a_batch_is_formed_reaches_its_callers() -> None:
    """Work taken out of the queue belongs to no one until it runs: an error before its run
    (here the run-time lookup, once) must fail it, not leave its callers waiting for good."""

    class FailingOnce(RunTimes):
        failed = False

        def expect(self, steps: int) -> float | None:
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise RuntimeError("injected while forming a batch")
            return super().expect(steps)

    async def main() -> list[object]:
        registry, metrics = await echo_model()
        model = registry.get("echo")
        table = SessionTable(10, 60, metrics)
        slots = [table.open(model, None).slot for _ in range(3)]
        x = np.ones((1, 1, 1), np.float32)
        times = FailingOnce()
        times.measured(1, 1e-6)
        model.batcher.run_times = times
        calls = [asyncio.ensure_future(model.batcher.run(x, [slot])) for slot in slots]
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        after = await model.batcher.run(x, [slots[0]])  # the batcher goes on
        await model.batcher.close()
        return [*done, after]

    outcomes = asyncio.run(main())
    assert any(isinstance(o, RuntimeError) for o in outcomes[:3])
    assert not isinstance(outcomes[3], BaseException)
