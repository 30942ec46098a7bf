"""The state stores: one contract, the same tests on each (a real redis-server on loopback, an
SQLite file on disk); then sessions kept by the SQLite store over the wire, across a restart
of the server and through idle spills to it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bench.cluster import Redis, ServerProcess
from rnnserve.client import Client, RnnServeError, new_session_id
from rnnserve.cluster.disk_store import SqliteStore
from rnnserve.cluster.handoff import RedisHandoff
from rnnserve.engine.sources import ParkedSession, SharedStore, StoreUnavailable
from tests.conftest import FakeClock, RunningServer, make_config, running

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed (.ci/run installs it)"
)
KINDS = ["redis", "sqlite"]


def open_kind(kind: str, redis_url: str, where: Path, ttl: float = 60.0) -> SharedStore:
    if kind == "redis":
        return RedisHandoff(redis_url, ttl, wait_seconds=1.0, park_seconds=2.0)
    return SqliteStore(f"sqlite://{where / 'sessions.db'}", ttl, 1.0, 2.0)


@pytest.fixture(params=KINDS)
def stores(request, redis_url: str, tmp_path: Path):
    """Two handles on one store, as two processes (workers or replicas) have: a test's
    coroutine gets them and they are closed on its own event loop."""

    def run(test) -> None:
        async def go() -> None:
            a = open_kind(request.param, redis_url, tmp_path)
            b = open_kind(request.param, redis_url, tmp_path)
            try:
                await test(a, b)
            finally:
                await a.close()
                await b.close()

        asyncio.run(go())

    return run


def parked(owner: str = "", steps: int = 3, seed: int = 0) -> ParkedSession:
    rng = np.random.default_rng(seed)
    return ParkedSession(
        new_session_id(),
        owner,
        "echo",
        1,
        steps,
        1.5,
        {"h0": rng.standard_normal(8).astype(np.float32)},
        "ab" * 32,
    )


def test_a_parked_session_is_adopted_once_exactly(stores) -> None:
    async def go(a: SharedStore, b: SharedStore) -> None:
        mine, theirs = parked(seed=1), parked("alice", seed=2)
        await a.park([mine, theirs])
        assert (await b.adopt([theirs.session_id], "", wait=False)).taken == {}  # alice's
        got = (await b.adopt([mine.session_id, "unknown"], "", wait=False)).taken
        assert list(got) == [mine.session_id]
        back = got[mine.session_id]
        assert (back.model, back.version, back.steps, back.graph) == ("echo", 1, 3, mine.graph)
        assert back.states["h0"].tobytes() == mine.states["h0"].tobytes()
        assert (await a.adopt([mine.session_id], "", wait=False)).taken == {}  # taken once
        assert list((await a.adopt([theirs.session_id], "alice", wait=False)).taken) == [
            theirs.session_id
        ]
        await a.give_back([mine])
        assert list((await a.adopt([mine.session_id], "", wait=False)).taken) == [mine.session_id]

    stores(go)


def test_two_adopters_never_both_take_a_session(stores) -> None:
    async def go(a: SharedStore, b: SharedStore) -> None:
        sessions = [parked(seed=i) for i in range(200)]
        await a.park(sessions)
        ids = [s.session_id for s in sessions]
        first, second = await asyncio.gather(
            a.adopt(ids, "", wait=False), b.adopt(list(reversed(ids)), "", wait=False)
        )
        assert not set(first.taken) & set(second.taken)
        assert set(first.taken) | set(second.taken) == set(ids)

    stores(go)


def test_an_adopter_waits_while_another_process_parks(stores) -> None:
    async def go(a: SharedStore, b: SharedStore) -> None:
        late = parked(seed=3)
        await a.announce_parking()
        assert await b.parking()

        async def park_later() -> None:
            await asyncio.sleep(0.2)
            await a.park([late])

        parking = asyncio.ensure_future(park_later())
        got = await b.adopt([late.session_id], "", wait=True)
        await parking
        assert list(got.taken) == [late.session_id]
        assert not await b.parking()  # park ended the mark

    stores(go)


def test_an_id_parked_is_not_new(stores) -> None:
    async def go(a: SharedStore, b: SharedStore) -> None:
        session = parked("bob", seed=4)
        await a.park([session])
        assert await b.claim_new(f"bob/{session.session_id}", 60_000) == "parked"
        assert await b.claim_new(f"bob/{new_session_id()}", 60_000) is None

    stores(go)


@pytest.mark.parametrize("kind", KINDS)
def test_a_record_expires_after_its_ttl(kind: str, redis_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        store = open_kind(kind, redis_url, tmp_path, ttl=0.3)
        try:
            session = parked(seed=5)
            await store.park([session])
            await asyncio.sleep(0.6)
            assert (await store.adopt([session.session_id], "", wait=False)).taken == {}
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_that_cannot_be_reached_says_so(kind: str, tmp_path: Path) -> None:
    """A Redis nobody listens on; a database file whose directory is a file."""
    (tmp_path / "a-file").write_text("")
    store = (
        RedisHandoff("redis://127.0.0.1:1/0", 60, 0.1, 1)
        if kind == "redis"
        else SqliteStore(f"sqlite://{tmp_path / 'a-file' / 'sessions.db'}", 60, 0.1, 1)
    )

    async def go() -> None:
        try:
            with pytest.raises(StoreUnavailable, match="unreachable|failed"):
                await store.park([parked()])
            with pytest.raises(StoreUnavailable):
                await store.adopt(["x"], "", wait=False)
            assert not await store.parking()
        finally:
            await store.close()

    asyncio.run(go())


def corrupt(kind: str, redis_url: str, where: Path, key: str, record: bytes) -> None:
    """Overwrite a parked record behind the store's back."""
    if kind == "redis":
        import redis

        with redis.Redis.from_url(redis_url) as client:
            client.set(f"rnnserve:session:{key}", record, px=60_000)
    else:
        with sqlite3.connect(where / "sessions.db") as db:
            db.execute("UPDATE parked SET record = ? WHERE key = ?", (record, key))


@pytest.mark.parametrize("kind", KINDS)
def test_an_unreadable_record_is_lost_loudly_not_served(
    kind: str, redis_url: str, tmp_path: Path, caplog
) -> None:
    store = open_kind(kind, redis_url, tmp_path)
    session, fine = parked(seed=6), parked(seed=7)

    async def go() -> None:
        await store.park([session, fine])
        corrupt(kind, redis_url, tmp_path, session.session_id, b'{"model": "echo", "states": 3')
        got = await store.adopt([session.session_id, fine.session_id], "", wait=False)
        assert list(got.taken) == [fine.session_id]
        assert "Expecting" in got.unreadable[session.session_id]  # json's own words
        assert (await store.adopt([session.session_id], "", wait=False)).taken == {}  # gone
        await store.close()

    asyncio.run(go())
    assert f"LOST session {session.session_id}: its parked record is unreadable" in caplog.text


def test_a_call_for_a_session_whose_record_is_unreadable_is_told_so(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'sessions.db'}"
    first = RunningServer(make_config(state_store=store))
    try:
        with first.client() as client:
            session = client.open_session("echo").session_id
            client.step(session, [1.0])
    finally:
        first.stop()  # parked
    with sqlite3.connect(tmp_path / "sessions.db") as db:  # truncated on disk
        db.execute("UPDATE parked SET record = substr(record, 1, 40)")
    with running(state_store=store) as second, second.client() as client:
        with pytest.raises(RnnServeError) as err:
            client.step(session, [1.0])
        assert err.value.code.name == "FAILED_PRECONDITION"
        assert "was in the state store, but its record is unreadable" in err.value.message
        sample = second.server.engine.metrics.registry.get_sample_value
        assert sample("rnnserve_sessions_lost_total", {"reason": "store"}) == 1


def bits(seed: int, rows: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (rows, steps, 2)).astype(np.float32)


def test_sessions_continue_exactly_after_a_restart_on_the_same_file(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'state' / 'sessions.db'}"
    x = bits(1, 5, 12)
    with running() as reference, reference.client() as client:
        expected = client.predict("binary_add", x).y
    first = RunningServer(make_config(state_store=store))
    try:
        with first.client() as client:
            ids = [client.open_session("binary_add").session_id for _ in x]
            head = [client.step(i, row[:7]) for i, row in zip(ids, x)]
    finally:
        first.stop()  # SIGTERM's drain parks every session in the file
    with running(state_store=store) as second, second.client() as client:
        with client.stream() as stream:
            assert stream.resume(ids[0]).steps == 7
            tails = [stream.step(x[0, 7:])]
        tails += [client.step(i, row[7:]) for i, row in zip(ids[1:], x[1:])]
        for row, (h, t) in enumerate(zip(head, tails)):
            assert np.max(np.abs(np.concatenate([h, t]) - expected[row])) <= 1e-5
        sample = second.server.engine.metrics.registry.get_sample_value
        labels = {"model": "binary_add", "version": "1", "direction": "adopted"}
        assert sample("rnnserve_session_handoffs_total", labels) == len(x)


def test_idle_sessions_spill_to_the_store_and_come_back_exactly(tmp_path: Path) -> None:
    clock = FakeClock()
    x = bits(2, 40, 10)
    with running() as reference, reference.client() as client:
        expected = client.predict("binary_add", x).y
    store = f"sqlite://{tmp_path / 'sessions.db'}"
    with (
        running(clock=clock, state_store=store, session_idle_timeout=10, session_ttl=3600) as srv,
        srv.client() as client,
    ):
        ids = [client.open_session("binary_add").session_id for _ in x]
        head = [client.step(i, row[:4]) for i, row in zip(ids, x)]
        clock.advance(5)
        kept = ids[0]
        client.step(kept, x[0, 4:5])  # used since: stays
        clock.advance(6)
        assert srv.sweep() == 0  # nothing evicted: spilled
        engine = srv.server.engine
        assert [s.id for s in engine._sessions.live()] == [kept]
        sample = engine.metrics.registry.get_sample_value
        labels = {"model": "binary_add", "version": "1"}
        spilled = {**labels, "direction": "spilled"}
        assert sample("rnnserve_session_handoffs_total", spilled) == len(x) - 1
        tails = [client.step(kept, x[0, 5:])]
        tails += [client.step(i, row[4:]) for i, row in zip(ids[1:], x[1:])]
        head[0] = np.concatenate([head[0], expected[0, 4:5]])
        for row, (h, t) in enumerate(zip(head, tails)):
            assert np.max(np.abs(np.concatenate([h, t]) - expected[row])) <= 1e-5
        adopted = {**labels, "direction": "adopted"}
        assert sample("rnnserve_session_handoffs_total", adopted) == len(x) - 1
        client.close_session(ids[1])
        with pytest.raises(RnnServeError) as err:
            client.step(ids[1], x[1, :1])
        assert err.value.code.name == "FAILED_PRECONDITION"  # closed, as without a store


def test_idle_sessions_stay_in_memory_while_the_store_fails(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    clock = FakeClock()
    store = f"sqlite://{tmp_path / 'a-file' / 'sessions.db'}"
    x = bits(3, 1, 6)
    with (
        running(clock=clock, state_store=store, session_idle_timeout=10, session_ttl=60) as srv,
        srv.client() as client,
    ):
        expected = client.predict("binary_add", x).y
        session = client.open_session("binary_add").session_id
        head = client.step(session, x[0, :3])
        clock.advance(11)
        assert srv.sweep() == 0
        assert len(srv.server.engine._sessions.live()) == 1  # kept, not dropped
        tail = client.step(session, x[0, 3:])
        assert np.max(np.abs(np.concatenate([head, tail]) - expected[0])) <= 1e-5
        clock.advance(61 + 11)
        assert srv.sweep() == 1  # past its whole lifetime it ends, as without a store


def test_max_sessions_bounds_only_the_sessions_in_memory(tmp_path: Path) -> None:
    """400 sessions through a table of 50: the least recently used are spilled to make room
    for each new or returning one, and every one continues exactly; a message naming 40
    spilled sessions brings all of them back at once, spilling none of its own."""
    x = bits(4, 400, 6)
    with running() as reference, reference.client() as client:
        expected = client.predict("binary_add", x).y
    store = f"sqlite://{tmp_path / 'sessions.db'}"
    with (
        running(state_store=store, session_ttl=3600, max_sessions=50) as srv,
        srv.client() as client,
    ):
        ids = [client.open_session("binary_add").session_id for _ in x]
        got = [[client.step(i, row[:2])] for i, row in zip(ids, x)]
        for row in reversed(range(len(x))):  # the most recently spilled come back first
            got[row].append(client.step(ids[row], x[row, 2:4]))
        batch = client.step_many(ids[:40], x[:40, 4:])
        assert not batch.errors
        for row in range(len(x)):
            tail = batch.y[row] if row < 40 else client.step(ids[row], x[row, 4:])
            streamed = np.concatenate([*got[row], tail])
            assert np.max(np.abs(streamed - expected[row])) <= 1e-5, row
        engine = srv.server.engine
        assert len(engine._sessions.live()) <= 50
        sample = engine.metrics.registry.get_sample_value
        spilled = {"model": "binary_add", "version": "1", "direction": "spilled"}
        assert sample("rnnserve_session_handoffs_total", spilled) >= 3 * (len(x) - 50)


def test_two_workers_share_the_file_through_spills_a_crash_and_a_restart(tmp_path: Path) -> None:
    """`serve --workers 2` on one file: sessions spilled by either worker come back on
    whichever worker their next call reaches; a SIGKILLed worker loses none of the sessions
    that were in the file; a drain and a restart on the same file continue the rest."""
    x = bits(5, 12, 9)
    flags = (
        "--workers", "2", "--state-store", f"sqlite://{tmp_path / 'sessions.db'}",
        "--session-idle-timeout", "0.4", "--session-ttl", "600",
    )  # fmt: skip
    server = ServerProcess(tmp_path / "log", *flags, metrics=True)
    try:
        with Client(server.address) as client:
            expected = client.predict("binary_add", x).y
        ids = []
        for _ in x:
            with Client(server.address) as client:  # a connection each: either worker
                ids.append(client.open_session("binary_add").session_id)
        got: list[list[np.ndarray]] = [[] for _ in x]

        def steps(t: slice) -> None:
            for row, session in enumerate(ids):
                with Client(server.address) as client:
                    got[row].append(client.step(session, x[row, t]))

        steps(slice(0, 3))
        deadline = time.monotonic() + 20
        while server.metric("rnnserve_session_handoffs_total", direction="spilled") < len(x):
            assert time.monotonic() < deadline, "idle sessions were not spilled"
            time.sleep(0.1)
        assert server.metric("rnnserve_sessions") == 0
        workers = subprocess.run(
            ["pgrep", "-P", str(server.proc.pid), "-f", "spawn_main"],
            capture_output=True,
            text=True,
        ).stdout.split()
        os.kill(int(workers[0]), signal.SIGKILL)  # a worker dies: what it spilled is safe
        deadline = time.monotonic() + 60
        while not (
            server.metric("rnnserve_worker_restarts_total") == 1
            and server.metric("rnnserve_workers") == 2
        ):
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
        steps(slice(3, 6))
    finally:
        server.stop()  # the drain parks what is in memory now
    server = ServerProcess(tmp_path / "log2", *flags, metrics=True)
    try:
        steps(slice(6, 9))
    finally:
        server.stop()
    for row in range(len(x)):
        assert np.max(np.abs(np.concatenate(got[row]) - expected[row])) <= 1e-5, row


def test_a_full_redis_keeps_idle_sessions_in_memory_and_leaves_no_record(tmp_path: Path) -> None:
    """Redis at its maxmemory refuses the spill's writes partway: every session stays live and
    exact, and no record is left in Redis beside a live session."""
    import redis as redis_py

    full = Redis("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    try:
        with redis_py.Redis.from_url(full.url) as direct:
            for n in range(8):  # most of the 3 MiB, in pieces Redis accepts
                direct.set(f"ballast:{n}", b"x" * 100_000)
            clock = FakeClock()
            x = bits(6, 1500, 4)
            with running() as reference, reference.client() as client:
                expected = client.predict("binary_add", x).y
            with (
                running(
                    clock=clock, state_store=full.url, session_idle_timeout=10, session_ttl=60
                ) as srv,
                srv.client() as client,
            ):
                ids = [client.open_session("binary_add").session_id for _ in x]
                head = client.step_many(ids, x[:, :2]).y
                clock.advance(11)
                srv.sweep()
                assert len(srv.server.engine._sessions.live()) == len(x)  # all kept
                assert direct.keys("rnnserve:session:*") == []
                tail = client.step_many(ids, x[:, 2:]).y
                assert np.max(np.abs(np.concatenate([head, tail], axis=1) - expected)) <= 1e-5
    finally:
        full.stop()


def test_calls_that_give_up_mid_spill_lose_no_session(tmp_path: Path) -> None:
    """Opens on a full table each make room by spilling another session, and every one gives
    up (its deadline) while the store write is under way (a disk slowed to 50 ms a write):
    no caller's cancellation stops that write, so every session is still somewhere."""
    store = f"sqlite://{tmp_path / 'sessions.db'}"
    x = bits(7, 24, 2)
    with running() as reference, reference.client() as client:
        expected = client.predict("binary_add", x).y
    with running(state_store=store, session_ttl=3600, max_sessions=8) as srv:
        with srv.client() as client:
            ids = [client.open_session("binary_add").session_id for _ in x]
            head = [client.step(i, row[:1]) for i, row in zip(ids, x)]
        disk = srv.server.engine.moves._handoff
        write = disk.give_back

        async def slow_write(parked) -> None:
            await asyncio.sleep(0.05)
            await write(parked)

        disk.give_back = slow_write
        gave_up = 0
        with srv.client(timeout=0.02) as hasty:
            for _ in range(10):
                try:
                    hasty.open_session("binary_add")
                except RnnServeError as exc:
                    gave_up += exc.code.name == "DEADLINE_EXCEEDED"
        assert gave_up >= 5
        disk.give_back = write
        with srv.client() as client:
            tails = [client.step(i, row[1:]) for i, row in zip(ids, x)]
        for row, (h, t) in enumerate(zip(head, tails)):
            assert np.max(np.abs(np.concatenate([h, t]) - expected[row])) <= 1e-5
        sample = srv.server.engine.metrics.registry.get_sample_value
        assert not sample("rnnserve_sessions_lost_total", {"reason": "store"})
