"""The memory budget over the wire: chunked and spanned runs are exact, work that cannot fit is
refused with advice, and the byte semaphore admits fairly and cleans up after cancellation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rnnserve.client import Client, RnnServeError
from rnnserve.errors import ResourceExhausted
from rnnserve.state.memory import MemoryBudget, RunCost
from tests.conftest import RunningServer, running, spec

SMALL = 1024 * 1024
"""A 1 MiB budget: 256 KiB per run, so forecast runs ~19 sequences of 20 steps at a time."""


def test_chunked_predict_equals_one_run(client: Client) -> None:
    rng = np.random.default_rng(4)
    x = [rng.uniform(320, 370, (n, 1)).astype(np.float32) for n in rng.integers(1, 21, 150)]
    h0 = rng.normal(size=(150, 32)).astype(np.float32)
    whole = client.predict("forecast", x, initial_states={"h0": h0})
    last = client.predict("forecast", x, last_only=True)
    assert RunCost.of(spec("forecast")).run(150, 20) > SMALL // 4  # really split below
    with running(memory_budget=SMALL) as small, small.client() as on_small:
        chunked = on_small.predict("forecast", x, initial_states={"h0": h0})  # ragged, too
        chunked_last = on_small.predict("forecast", x, last_only=True)
    assert np.array_equal(chunked.y, whole.y)
    assert np.array_equal(chunked.final_states["h0"], whole.final_states["h0"])
    assert np.array_equal(chunked_last.y, last.y)


def test_long_steps_run_in_spans_and_equal_one_run(server: RunningServer) -> None:
    x = np.random.default_rng(5).integers(0, 2, (40, 300, 2)).astype(np.float32)
    with server.client() as client:
        expected = client.predict("binary_add", x).y
    with running(memory_budget=SMALL) as small, small.client() as on_small:
        ids = [on_small.open_session("binary_add").session_id for _ in x]
        batch = on_small.step_many(ids, x)  # 40 x 300 steps: far over 256 KiB in one run
    assert not batch.errors and batch.steps == [300] * 40
    assert np.max(np.abs(batch.y - expected)) <= 1e-5


def test_work_that_cannot_fit_is_refused_with_advice() -> None:
    with running(memory_budget=SMALL) as small, small.client() as client:
        with pytest.raises(RnnServeError) as err:
            client.predict("forecast", np.ones((1, 1000, 1), np.float32))
        assert err.value.code.name == "RESOURCE_EXHAUSTED"
        assert "split long sequences" in err.value.message
        assert client.predict("forecast", np.ones((1, 100, 1))).y.shape == (1, 100, 1)


def test_budget_is_first_come_first_served_and_bounded() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        order: list[str] = []
        first = budget.reserve(80, "first", "")
        await first.__aenter__()

        async def take(name: str, nbytes: int) -> None:
            async with budget.reserve(nbytes, name, ""):
                order.append(name)

        big = asyncio.create_task(take("big", 60))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # fits now, but queues behind big
        await asyncio.sleep(0)
        assert order == [] and budget.queued == 70
        with pytest.raises(ResourceExhausted, match="retry with backoff"):
            await take("overflow", 40)  # 70 queued + 40 > one budget's worth
        cancelled = asyncio.create_task(take("cancelled", 20))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert budget.queued == 70
        await first.__aexit__(None, None, None)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.used == 0 and budget.queued == 0
        with pytest.raises(ResourceExhausted, match="--memory-budget"):
            budget.reserve(101, "too much", "send less")

    asyncio.run(scenario())


def test_held_bytes_never_make_a_request_wait() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        assert budget.hold(70) and budget.used == 70
        assert not budget.hold(40) and budget.used == 70  # no room: nothing taken
        waiting = asyncio.create_task(budget.reserve(50, "waiting", "").__aenter__())
        await asyncio.sleep(0)
        assert not budget.hold(10)  # room, but a request waits: it goes first
        budget.release(70)
        await waiting
        assert budget.used == 50

    asyncio.run(scenario())


def test_a_stream_keeps_its_sessions_within_the_budget_until_it_ends() -> None:
    """What a multiplexing stream keeps between messages is held against --memory-budget
    while the stream lives, follows the sessions it names, and is given back when it ends."""
    with running(memory_budget=SMALL) as srv, srv.client() as client:
        budget = srv.server.engine.budget
        ids = [client.open_session("echo").session_id for _ in range(50)]
        x = np.ones((50, 1, 1), np.float32)
        with client.stream() as gateway:
            gateway.step_many(ids, x)
            assert budget.used == 32 * 50  # nothing else is in flight
            gateway.step_many(ids[:20], x[:20])
            assert budget.used == 32 * 20
            last = gateway.step_many(ids[:20], x[:20])
            assert budget.used == 32 * 20 and last.steps == [3] * 20
        deadline = time.monotonic() + 10
        while budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.used == 0
