"""Adoption under load and store outages, with a real redis-server: no session is ever lost."""

from __future__ import annotations

import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from bench.cluster import Redis
from rnnserve.client import Client, RnnServeError
from tests.conftest import RunningServer, make_config, running

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed (.ci/run installs it)"
)


def test_hundreds_of_parked_sessions_adopted_in_one_message(redis_url: str) -> None:
    rng = np.random.default_rng(7)
    a = RunningServer(make_config(state_store=redis_url))
    with Client(a.address) as on_a:
        ids = [on_a.open_session("echo").session_id for _ in range(400)]
        batch = on_a.step_many(ids, rng.integers(0, 2, (400, 5, 1)).astype(np.float32))
        assert not batch.errors
    a.stop()  # drain: all 400 parked
    with (
        running(state_store=redis_url, handoff_wait=30) as b,
        Client(b.address) as on_b,
        ThreadPoolExecutor(16) as pool,
    ):
        unknown = [secrets.token_hex(16) for _ in range(300)]
        lookups = pool.map(lambda i: _code(Client(b.address, timeout=10).snapshot, i), unknown)
        x = np.zeros((400, 1, 1), np.float32)
        adopted = on_b.step_many(ids, x)
        assert set(lookups) == {"NOT_FOUND"}, "unknown ids: NOT_FOUND, fast, never INTERNAL"
        assert not adopted.errors and adopted.steps == [6] * 400
        assert b.server.engine.live_sessions == 400
        store = redis.Redis.from_url(redis_url)
        assert store.exists(*(f"rnnserve:session:{i}" for i in ids)) == 0


def _code(call, *args) -> str:
    try:
        call(*args)
    except RnnServeError as exc:
        return exc.code.name
    return "OK"


def test_adopted_states_are_byte_identical(redis_url: str) -> None:
    a = RunningServer(make_config(state_store=redis_url))
    x = np.random.default_rng(3).integers(0, 2, (50, 7, 2)).astype(np.float32)
    with Client(a.address) as on_a:
        ids = [on_a.open_session("binary_add").session_id for _ in range(50)]
        on_a.step_many(ids, x)
        before = {i: {k: v.tobytes() for k, v in on_a.snapshot(i).items()} for i in ids}
    a.stop()
    with (
        running(state_store=redis_url) as b,
        Client(b.address) as on_b,
        ThreadPoolExecutor(8) as pool,
    ):
        after = dict(zip(ids, pool.map(on_b.snapshot, ids)))  # concurrent adoptions
        for i in ids:
            assert {k: v.tobytes() for k, v in after[i].items()} == before[i]


def test_store_outage_fails_only_the_rows_it_touches() -> None:
    store = Redis()
    try:
        with (
            running(state_store=store.url, handoff_wait=30) as srv,
            Client(srv.address, timeout=10) as client,
        ):
            live = client.open_session("echo").session_id
            store.stop()
            elsewhere = secrets.token_hex(16)
            batch = client.step_many([live, elsewhere], np.ones((2, 1, 1), np.float32))
            assert 0 not in batch.errors and batch.steps[0] == 1
            assert batch.errors[1].code.name == "UNAVAILABLE"
            assert _code(client.snapshot, elsewhere) == "UNAVAILABLE"
            assert client.step(live, [1.0]).shape == (1, 2)
            lost = srv.call(srv.server.stop())
            assert lost == 1, "a failed drain handoff reports the sessions it loses"
    finally:
        if store.proc.poll() is None:
            store.stop()
