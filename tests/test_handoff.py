"""Session handoff between replicas through a real Redis server on loopback."""

from __future__ import annotations

import base64
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.client import Client, RnnServeError, new_session_id
from tests.conftest import RunningServer, make_config, running

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed (.ci/run installs it)"
)


def bits(seed: int, rows: int, steps: int, features: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (rows, steps, features)).astype(np.float32)


def test_drained_sessions_continue_exactly_on_another_replica(redis_url: str) -> None:
    adder, echo = bits(1, 6, 16, 2), bits(2, 6, 16, 1)
    with running(state_store=redis_url) as b, Client(b.address) as on_b:
        expected_adder = on_b.predict("binary_add", adder).y
        expected_echo = on_b.predict("echo", echo).y
        a = RunningServer(make_config(state_store=redis_url))
        try:
            with Client(a.address) as on_a:
                ids = [on_a.open_session("binary_add").session_id for _ in adder] + [
                    on_a.open_session("echo").session_id for _ in echo
                ]
                first = [on_a.step(i, x[:8]) for i, x in zip(ids, [*adder, *echo])]
        finally:
            a.stop()  # SIGTERM's drain: every session is parked in Redis
        with pytest.raises(RnnServeError):
            Client(a.address, timeout=1).list_models()
        with on_b.stream() as stream:
            resumed = stream.resume(ids[0])
            assert resumed.steps == 8 and resumed.model == "binary_add"
            rest = [stream.step(adder[0, 8:])]
        rest += [on_b.step(i, x[8:]) for i, x in zip(ids[1:], [*adder[1:], *echo])]
        for row, (head, tail) in enumerate(zip(first, rest)):
            expected = (expected_adder if row < len(adder) else expected_echo)[row % len(adder)]
            assert np.max(np.abs(np.concatenate([head, tail]) - expected)) <= 1e-5
        sample = b.server.engine.metrics.registry.get_sample_value
        assert sample(
            "rnnserve_session_handoffs_total",
            {"model": "echo", "version": "1", "direction": "adopted"},
        ) == len(echo)
        with running(state_store=redis_url, handoff_wait=0.2) as c, Client(c.address) as on_c:
            with pytest.raises(RnnServeError) as err:
                on_c.step(ids[0], adder[0, :1])  # owned by b now: nobody else can take it
            assert err.value.code.name == "NOT_FOUND"


def test_a_chosen_id_is_one_session_across_replicas(redis_url: str) -> None:
    """An id live on one replica, or parked by one, could be opened again on another: two
    sessions of one id, one of them later dropped by a move. Now the second open is
    ALREADY_EXISTS and leaves nothing behind, and the first session goes on exactly."""
    import time

    import grpc
    import redis

    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

    chosen = new_session_id()

    def open_on(server: RunningServer) -> str:
        with grpc.insecure_channel(server.address) as channel:
            try:
                rnnserve_pb2_grpc.InferenceStub(channel).OpenSession(
                    rnnserve_pb2.OpenSessionRequest(model="echo", session_id=chosen), timeout=10
                )
                return "OK"
            except grpc.RpcError as exc:
                assert "already" in exc.details()
                return exc.code().name

    with running(state_store=redis_url) as b, Client(b.address) as on_b:
        a = RunningServer(make_config(state_store=redis_url))
        try:
            with Client(a.address) as on_a:
                assert open_on(a) == "OK"
                on_a.step(chosen, [1.0])
                assert open_on(b) == "ALREADY_EXISTS"  # live on a
                assert b.server.engine.live_sessions == 0
                assert open_on(a) == "ALREADY_EXISTS"  # live here
        finally:
            a.stop()  # parked in the store
        assert open_on(b) == "ALREADY_EXISTS"  # parked
        assert b.server.engine.live_sessions == 0
        whole = on_b.predict("echo", np.array([[[1.0], [0.0]]])).y[0]
        assert np.max(np.abs(on_b.step(chosen, [0.0]) - whole[1:])) <= 1e-6  # adopted, exact
        with running(state_store=redis_url) as c:
            assert open_on(c) == "ALREADY_EXISTS"  # adopted by b: held there now
            on_b.close_session(chosen)
            store, deadline = redis.Redis.from_url(redis_url), time.monotonic() + 10
            while store.exists(f"rnnserve:owner:{chosen}"):  # dropped in the background
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # the record of a process that died (nobody listens on its release channel)
            store.set(f"rnnserve:owner:{chosen}", "0123456789abcdef")
            assert open_on(c) == "OK"  # ended: the id is free again, on any replica
            assert store.get(f"rnnserve:owner:{chosen}") != b"0123456789abcdef"


def test_without_a_store_sessions_end_with_the_process() -> None:
    with running() as a, Client(a.address) as client:
        session_id = client.open_session("echo").session_id
    with running() as b, Client(b.address) as client:
        with pytest.raises(RnnServeError) as err:
            client.step(session_id, [1.0])
        assert err.value.code.name == "NOT_FOUND"


def test_v2_sequences_survive_a_handoff(redis_url: str) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")

    def infer(address: str, x: np.ndarray, **flags) -> np.ndarray:
        client = grpcclient.InferenceServerClient(url=address)
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            return client.infer("forecast", [tensor], sequence_id=77, **flags).as_numpy("y")
        finally:
            client.close()

    x = np.random.default_rng(5).uniform(320, 370, (1, 10, 1)).astype(np.float32)
    with running(state_store=redis_url) as b:
        a = RunningServer(make_config(state_store=redis_url))
        try:
            first = infer(a.address, x[:, :4], sequence_start=True)
        finally:
            a.stop()
        rest = infer(b.address, x[:, 4:], sequence_end=True)  # no START: adopted from Redis
        with Client(b.address) as client:
            whole = client.predict("forecast", x).y
    got = np.concatenate([first, rest], axis=1)
    assert np.max(np.abs(got - whole) / (1 + np.abs(whole))) <= 1e-5


def test_sessions_follow_their_calls_to_another_live_replica(redis_url: str) -> None:
    """A rehash (e.g. a scale-up) sends a live session's calls to another replica while its
    holder is still up: the holder parks it on request and it continues exactly, both ways,
    for unary calls, streams and v2 sequences."""
    import time

    import redis

    store = redis.Redis.from_url(redis_url)
    x = bits(3, 1, 40, 2)[0]
    with (
        running(state_store=redis_url) as a,
        running(state_store=redis_url) as b,
        Client(a.address) as on_a,
        Client(b.address) as on_b,
    ):
        expected = on_a.predict("binary_add", x[None]).y[0]
        session = on_a.open_session("binary_add").session_id
        deadline = time.monotonic() + 10
        while not store.exists(f"rnnserve:owner:{session}"):  # recorded in the background
            assert time.monotonic() < deadline
            time.sleep(0.01)
        got, moved_ms = [], []
        for t in range(len(x)):
            here = (on_a, on_b)[(t // 5) % 2]  # five steps on a, five on b, ...
            start = time.perf_counter()
            got.append(here.step(session, x[t : t + 1]))
            if t % 5 == 0 and t:
                moved_ms.append((time.perf_counter() - start) * 1e3)
        assert np.max(np.abs(np.concatenate(got) - expected)) <= 1e-5
        with on_a.stream(resume=session) as stream:  # a stream's resume moves it too
            assert stream.session.steps == len(x)
        for server in (a, b):
            sample = server.server.engine.metrics.registry.get_sample_value
            assert (
                sample(
                    "rnnserve_session_handoffs_total",
                    {"model": "binary_add", "version": "1", "direction": "released"},
                )
                >= 3
            )
        print(
            f"moves between live replicas: p50 {np.percentile(moved_ms, 50):.2f} ms, "
            f"max {max(moved_ms):.2f} ms over {len(moved_ms)}"
        )


def test_v2_sequences_follow_their_calls_to_another_live_replica(redis_url: str) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import time

    import redis

    from rnnserve.doors.kserve_dataplane import sequence_session_id

    store = redis.Redis.from_url(redis_url)
    x = np.random.default_rng(6).uniform(320, 370, (1, 8, 1)).astype(np.float32)
    with running(state_store=redis_url) as a, running(state_store=redis_url) as b:
        clients = {s: grpcclient.InferenceServerClient(s.address) for s in (a, b)}

        def infer(server: RunningServer, t: int, **flags) -> np.ndarray:
            tensor = grpcclient.InferInput("x", [1, 1, 1], "FP32")
            tensor.set_data_from_numpy(x[:, t : t + 1])
            return (
                clients[server]
                .infer("forecast", [tensor], sequence_id="walks", **flags)
                .as_numpy("y")
            )

        outputs = [infer(a, 0, sequence_start=True)]
        record = f"rnnserve:owner:{sequence_session_id('', 'forecast', 'walks')}"
        deadline = time.monotonic() + 10
        while not store.exists(record):  # the start's holder record, written in the background
            assert time.monotonic() < deadline, "the sequence start was never recorded"
            time.sleep(0.01)
        outputs += [infer(b, t) for t in range(1, 4)]  # moved to b while a lives
        outputs += [
            infer(a, t, sequence_end=t == x.shape[1] - 1)  # and back
            for t in range(4, x.shape[1])
        ]
        sample = a.server.engine.metrics.registry.get_sample_value
        assert (
            sample(
                "rnnserve_session_handoffs_total",
                {"model": "forecast", "version": "1", "direction": "released"},
            )
            == 1
        )
        for client in clients.values():
            client.close()
        with Client(a.address) as client:
            whole = client.predict("forecast", x).y
    assert np.max(np.abs(np.concatenate(outputs, axis=1) - whole)) <= 1e-5


def test_a_failed_release_request_does_not_end_the_listening(redis_url: str) -> None:
    """Release requests are served one by one from a Redis channel; an error in one (not the
    store's) is logged, and the next request is still heard."""
    import asyncio
    import json

    from rnnserve.cluster.handoff import RELEASE_CHANNEL, RedisHandoff

    async def scenario() -> list[list[str]]:
        handoff = RedisHandoff(redis_url, 60, 1, 5)
        served: list[list[str]] = []

        async def release(ids: list[str], owner: str) -> None:
            served.append(ids)
            if len(served) == 1:
                raise RuntimeError("a bug in one release")

        listening = asyncio.create_task(handoff.serve_releases(release))
        try:
            for ids in (["a"], ["b"]):
                for _ in range(100):  # until the listener has subscribed
                    request = json.dumps({"ids": ids, "owner": "x"})
                    if await handoff.client.publish(RELEASE_CHANNEL + handoff.replica, request):
                        break
                    await asyncio.sleep(0.02)
                for _ in range(100):
                    if served and served[-1] == ids:
                        break
                    await asyncio.sleep(0.02)
            return served
        finally:
            listening.cancel()
            await handoff.close()

    assert asyncio.run(scenario()) == [["a"], ["b"]]


def test_a_replica_whose_store_is_down_still_starts_sequences(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new v2 sequence needs nothing from the store; it used to be refused (UNAVAILABLE)
    while the store was down, and the drain then reported 0 sessions lost."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from bench.cluster import free_port

    def infer(client, x: np.ndarray, **flags) -> np.ndarray:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("forecast", [tensor], sequence_id=5, **flags).as_numpy("y")

    x = np.random.default_rng(6).uniform(320, 370, (1, 8, 1)).astype(np.float32)
    with running(state_store=f"redis://127.0.0.1:{free_port()}/0") as srv:
        client = grpcclient.InferenceServerClient(url=srv.address)
        try:
            first = infer(client, x[:, :3], sequence_start=True)
            rest = infer(client, x[:, 3:], sequence_end=True)
        finally:
            client.close()
        with Client(srv.address) as native:
            whole = native.predict("forecast", x).y
    assert np.max(np.abs(np.concatenate([first, rest], axis=1) - whole)) <= 1e-5
    assert not [r for r in caplog.records if "could not hand" in r.getMessage()]


RECORD_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.text(max_size=8), st.integers(), st.none()),
        "version": st.one_of(
            st.integers(-2, 2**70), st.floats(), st.booleans(), st.text(max_size=3)
        ),
        "steps": st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.none()),
        "idle_seconds": st.one_of(st.floats(), st.integers(-5, 5), st.text(max_size=3)),
        "owner": st.one_of(st.text(max_size=5), st.integers()),
        "graph": st.one_of(st.text(max_size=5), st.none()),
        "states": st.one_of(
            st.none(),
            st.lists(st.integers(), max_size=2),
            st.dictionaries(
                st.text(max_size=3),
                st.one_of(
                    st.text(max_size=12),
                    st.integers(),
                    st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode()),
                ),
                max_size=3,
            ),
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.one_of(
        RECORD_FIELDS,
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.integers(),
        st.text(max_size=5),
    )
)
def test_any_parked_record_decodes_to_a_checked_session_or_a_reason(doc) -> None:
    """The store is shared: whatever a record holds, decoding gives a session whose fields are
    in range, or ValueError, never another exception (they used to surface as INTERNAL)."""
    from rnnserve.engine.sources import MAX_STEPS, ParkedSession

    try:
        parked = ParkedSession.decode("0" * 32, json.dumps(doc).encode())
    except ValueError:
        return
    assert isinstance(parked.model, str) and parked.version >= 1
    assert 0 <= parked.steps <= MAX_STEPS and math.isfinite(parked.idle_seconds)
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in parked.states.values())


def test_parked_records_that_do_not_fit_take_no_slot(redis_url: str) -> None:
    """Records that are corrupt, of the wrong shape, not finite or of another graph under the
    same name and version: none becomes a session, none keeps a state slot, and the other
    graph's record stays in the store for a replica that has that graph."""
    import redis

    from rnnserve.cluster.handoff import KEY_PREFIX
    from rnnserve.engine.sources import ParkedSession

    store = redis.Redis.from_url(redis_url)
    with (
        running(state_store=redis_url, max_sessions=3, handoff_wait=0.1) as srv,
        Client(srv.address) as client,
    ):
        model = srv.server.engine._registry.get("binary_add", 1)
        states = {s.input: np.zeros(s.size, np.float32) for s in model.spec.states}

        def record(**changes) -> bytes:
            fields = dict(
                session_id="",
                owner="",
                model="binary_add",
                version=1,
                steps=3,
                idle_seconds=0.0,
                states=states,
                graph=model.graph,
            )
            return ParkedSession(**{**fields, **changes}).encode().encode()

        short = {**states, "h0": np.zeros(1, np.float32)}
        not_finite = {**states, "c1": np.full(20, np.nan, np.float32)}
        records = {
            "null": b"null",
            "list": b"[1, 2]",
            "huge steps": record(steps=2**70),
            "negative steps": record(steps=-5),
            "one float": record(states=short),
            "NaN": record(states=not_finite),
            "other graph": record(graph="0" * 64),
        }
        unreadable = {"null", "list", "huge steps", "negative steps"}
        ids = {}
        for n, (case, text) in enumerate(records.items()):
            ids[case] = f"{n:032x}"
            store.set(KEY_PREFIX + ids[case], text)
            for attempt in range(3):  # each call tries to adopt it again
                with pytest.raises(RnnServeError) as err:
                    client.step(ids[case], np.zeros((1, 2), np.float32))
                # An unreadable record is taken out and its first call told the session is
                # lost; a readable one that does not fit stays for a replica that can hold it.
                lost = case in unreadable and attempt == 0
                want = "FAILED_PRECONDITION" if lost else "NOT_FOUND"
                assert err.value.code.name == want, (case, err.value)
        opened = [client.open_session("binary_add").session_id for _ in range(3)]
        assert len(opened) == 3  # every slot is still free
        assert store.exists(KEY_PREFIX + ids["other graph"])
        good = f"{99:032x}"
        store.set(KEY_PREFIX + good, record())
        for session_id in opened:
            client.close_session(session_id)
        assert client.step(good, np.zeros((1, 2), np.float32)).shape == (1, 1)


def test_a_failed_row_carries_its_retry_delay() -> None:
    """A row of a Step message that fails for a passing reason (here: the store is down, so
    a session parked elsewhere cannot be reached) says when to retry, as a failed call does."""
    from bench.cluster import free_port

    with (
        running(state_store=f"redis://127.0.0.1:{free_port()}/0") as srv,
        Client(srv.address) as client,
    ):
        mine = client.open_session("echo").session_id
        batch = client.step_many([mine, "ab" * 16], np.ones((2, 1, 1), np.float32))
        assert list(batch.errors) == [1]
        assert batch.errors[1].code.name == "UNAVAILABLE"
        assert batch.errors[1].retry_after == 1.0
