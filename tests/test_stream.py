"""Streaming, stateful sessions through the real server."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, RnnServeError
from rnnserve.doors.tensors import to_tensor
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from tests.conftest import RunningServer

MODELS = {"echo": 1, "binary_add": 2, "digits": 8, "forecast": 1}


def sample(name: str, rows: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "forecast":
        return rng.uniform(315, 375, (rows, steps, 1)).astype(np.float32)
    if name == "digits":
        return rng.integers(0, 17, (rows, steps, 8)).astype(np.float32)
    return rng.integers(0, 2, (rows, steps, MODELS[name])).astype(np.float32)


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / (1 + np.abs(b))))


def test_echo_stream_returns_each_bit_three_steps_later(client: Client) -> None:
    bits = np.random.default_rng(0).integers(0, 2, 200)
    with client.stream("echo") as stream:
        predicted = [int(stream.step([bit]).argmax()) for bit in bits]
    assert predicted[3:] == bits[:-3].tolist()


def test_binary_add_stream_produces_exact_sums(client: Client) -> None:
    rng = np.random.default_rng(1)
    for a, b in rng.integers(0, 128, (20, 2)):
        with client.stream("binary_add") as stream:
            out = [stream.step([(a >> i) & 1, (b >> i) & 1])[0, 0] for i in range(8)]
            stream.close()
        assert sum(int(round(float(v))) << i for i, v in enumerate(out)) == a + b


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streamed_steps_equal_whole_sequence(client: Client, name: str) -> None:
    x = sample(name, 1, 8 if name == "digits" else 24, seed=2)[0]  # a digit image has 8 rows
    whole = client.predict(name, x[None])
    with client.stream(name) as stream:
        ys = np.concatenate([stream.step(step) for step in x])
        state = stream.snapshot()
    assert close(ys, whole.y[0]) <= 1e-5
    for key, value in whole.final_states.items():
        assert close(state[key], value[0]) <= 1e-5


def test_multi_step_messages_equal_single_steps(client: Client) -> None:
    x = sample("binary_add", 1, 64, seed=5)[0]
    with client.stream("binary_add") as single:
        one_by_one = np.concatenate([single.step(step) for step in x])
    for k in (8, 64):
        with client.stream("binary_add") as multi:
            chunks = np.concatenate([multi.step(x[i : i + k]) for i in range(0, len(x), k)])
        assert np.array_equal(chunks, one_by_one) or close(chunks, one_by_one) <= 1e-5


def test_multiplexed_stream_equals_per_session_streams(client: Client) -> None:
    x = sample("echo", 50, 10, seed=6)
    expected = client.predict("echo", x).y
    with client.stream() as gateway:
        ids = [client.open_session("echo").session_id for _ in range(50)]
        outs = [gateway.step_many(ids, x[:, t : t + 1]) for t in range(10)]
        for sid in ids:
            gateway.close(sid)
    y = np.concatenate([o.y for o in outs], axis=1)
    assert close(y, expected) <= 1e-5
    assert outs[-1].steps == [10] * 50 and not outs[-1].errors


def test_multiplexed_row_errors_spare_the_other_rows(client: Client) -> None:
    good = client.open_session("echo").session_id
    closed = client.open_session("echo").session_id
    client.close_session(closed)
    batch = client.step_many([good, "0" * 32, closed, "nothex"], np.ones((4, 1, 1), np.float32))
    assert set(batch.errors) == {1, 2, 3}
    assert batch.errors[1].code.name == "NOT_FOUND"
    assert batch.errors[2].code.name == "FAILED_PRECONDITION"
    assert batch.errors[3].code.name == "INVALID_ARGUMENT"
    assert np.isfinite(batch.y[0]).all() and np.isnan(batch.y[1:]).all()
    assert batch.steps == [1, 0, 0, 0]


def test_a_stream_naming_the_same_sessions_sees_them_end_and_return(client: Client) -> None:
    """The stream keeps what its last message's ids resolved to; a session that ends between
    messages (closed on another call, or closed and opened again under the same id) is seen
    anyway."""
    ids = [client.open_session("echo").session_id for _ in range(3)]
    reopened = "fedcba9876543210" * 2
    ids.append(reopened)
    bits = np.array([[[1.0]], [[0.0]], [[1.0]], [[1.0]]], np.float32)
    with client.stream() as gateway:
        gateway.open("echo", session_id=reopened)
        for _ in range(2):
            assert not gateway.step_many(ids, bits).errors
        gateway.close(reopened)
        gateway.open("echo", session_id=reopened)  # the same id, a new session from zeros
        renewed = gateway.step_many(ids, bits)
        assert not renewed.errors and renewed.steps == [3, 3, 3, 1]
        client.close_session(ids[1])
        after_close = gateway.step_many(ids, bits)
        assert list(after_close.errors) == [1]
        assert after_close.errors[1].code.name == "FAILED_PRECONDITION"
        assert after_close.steps == [4, 0, 4, 2]
        ids[1] = client.open_session("echo").session_id
        nan = bits.copy()
        nan[2] = np.nan
        with_nan = gateway.step_many(ids, nan)
        assert list(with_nan.errors) == [2] and with_nan.steps == [5, 1, 0, 3]
    with client.stream("echo") as fresh:
        expected = [fresh.step(b) for b in ([1.0], [1.0])]
    assert close(renewed.y[3], expected[0]) <= 1e-6
    assert close(after_close.y[3], expected[1]) <= 1e-6


def test_same_sessions_steps_what_the_stream_keeps(client: Client) -> None:
    """`same_sessions` on the wire: the previous step's sessions without their ids, re-resolved
    when one has ended since, refused when the stream keeps none."""
    ids = [client.open_session("echo").session_id for _ in range(3)]
    x = np.ones((3, 1, 1), np.float32)
    same = pb.StepRequest(same_sessions=True, x=to_tensor(x))

    def code(call) -> str:
        with pytest.raises(RnnServeError) as err:
            call()
        return err.value.code.name

    with client.stream() as gateway:
        step = lambda request: gateway.send(gateway._request(step=request), "step")  # noqa: E731
        assert code(lambda: step(same)) == "FAILED_PRECONDITION"  # nothing named yet
        step(pb.StepRequest(session_ids=ids, x=to_tensor(x)))
        assert list(step(same).steps) == [2, 2, 2]
        both = pb.StepRequest(session_ids=ids, same_sessions=True, x=to_tensor(x))
        assert code(lambda: step(both)) == "INVALID_ARGUMENT"
        own = gateway.open("echo")  # the stream's own session's steps are not what it keeps
        gateway.step([1.0])
        assert list(step(same).steps) == [3, 3, 3]
        assert gateway.close(own.session_id).steps == 1
        client.close_session(ids[1])
        after = step(same)
        assert list(after.steps) == [4, 0, 4] and [e.row for e in after.errors] == [1]
        assert code(lambda: step(same)) == "FAILED_PRECONDITION"  # a row failed: not kept
    assert code(lambda: client._call("Step", same, "")) == "INVALID_ARGUMENT"


def test_the_client_sends_repeated_sessions_once(client: Client) -> None:
    x = sample("echo", 20, 6, seed=9)
    expected = client.predict("echo", x).y
    ids = [client.open_session("echo").session_id for _ in range(20)]
    with client.stream() as gateway:
        outs = [gateway.step_many(ids, x[:, t : t + 1]) for t in range(3)]
        assert gateway._kept == ids  # the last two went as same_sessions
        client.close_session(ids[5])
        failed = gateway.step_many(ids, x[:, 3:4])
        assert list(failed.errors) == [5] and gateway._kept is None
        ids[5] = client.open_session("echo").session_id
        outs += [gateway.step_many(ids, x[:, t : t + 1]) for t in (4, 5)]
    y = np.concatenate([o.y for o in outs[:3]], axis=1)
    assert close(y, expected[:, :3]) <= 1e-5
    rest = [r for r in range(20) if r != 5]
    assert close(np.concatenate([o.y for o in outs[3:]], axis=1)[rest], expected[rest, 4:6]) <= 1e-5
    assert outs[-1].steps[5] == 2 and outs[-1].steps[0] == 6


def test_async_gateway_callers_sharing_a_stream_step_their_own_sessions(
    server: RunningServer,
) -> None:
    """Concurrent `step_many` calls on one asyncio stream: whether a message carries its ids or
    `same_sessions` is decided in turn with the messages before it, so each steps its own."""

    async def main() -> dict[str, int]:
        async with AsyncClient(server.address) as client, client.stream() as gateway:
            sets = [
                [(await client.open_session("echo")).session_id for _ in range(10)]
                for _ in range(2)
            ]
            x = np.ones((10, 1, 1), np.float32)
            await gateway.step_many(sets[1], x)  # kept: the calls below decide at once
            batches = await asyncio.gather(
                *(gateway.step_many(sets[i % 3 == 0], x) for i in range(30))
            )
            assert not any(b.errors for b in batches)
            return {sid: (await client.close_session(sid)).steps for ids in sets for sid in ids}

    steps = asyncio.run(main())
    assert sorted(set(steps.values())) == [11, 20]


def _stream_sequence(address: str, x: np.ndarray) -> np.ndarray:
    with Client(address) as c, c.stream("binary_add") as stream:
        out = np.concatenate([stream.step(step) for step in x])
        stream.close()
    return out


def test_64_concurrent_streams_equal_sequential(server: RunningServer, client: Client) -> None:
    xs = sample("binary_add", 64, 16, seed=7)
    sequential = client.predict("binary_add", xs).y
    with ThreadPoolExecutor(64) as pool:
        concurrent = list(pool.map(lambda x: _stream_sequence(server.address, x), xs))
    assert close(np.stack(concurrent), sequential) <= 1e-5


def test_resume_after_a_dropped_stream(client: Client) -> None:
    x = sample("forecast", 1, 20, seed=8)[0]
    whole = client.predict("forecast", x[None]).y[0]
    stream = client.stream("forecast")
    first = np.concatenate([stream.step(step) for step in x[:10]])
    session_id = stream.session.session_id
    stream.cancel()  # the connection drops mid-session
    with client.stream(resume=session_id) as resumed:
        assert resumed.session.steps == 10
        rest = np.concatenate([resumed.step(step) for step in x[10:]])
        resumed.close()
    assert close(np.concatenate([first, rest]), whole) <= 1e-5


def test_reset_snapshot_close_and_initial_states(client: Client) -> None:
    x = sample("binary_add", 1, 5, seed=9)[0]
    with client.stream("binary_add") as stream:
        before = stream.step(x)
        assert stream.snapshot()["c1"].shape == (20,)
        info = stream.reset()
        assert info.steps == 0
        assert np.all(stream.snapshot()["h0"] == 0)
        assert close(stream.step(x), before) <= 1e-5
        state = stream.snapshot()
        closed = stream.close()
        with pytest.raises(RnnServeError) as err:
            stream.step(x)
        assert err.value.code.name == "INVALID_ARGUMENT"  # no current session any more
    continued = client.open_session("binary_add", initial_states=state)
    more = client.step(continued.session_id, x)
    whole = client.predict("binary_add", np.concatenate([x, x])[None]).y[0]
    assert close(more, whole[5:]) <= 1e-5
    with pytest.raises(RnnServeError) as err:
        client.step(closed.session_id, x)
    assert err.value.code.name == "FAILED_PRECONDITION"


def test_unary_session_calls(client: Client) -> None:
    x = sample("digits", 1, 8, seed=10)[0]
    whole = client.predict("digits", x[None]).y[0]
    info = client.open_session("digits", version=1)
    assert len(info.session_id) == 32 and info.idle_timeout.seconds == 300
    ys = np.concatenate([client.step(info.session_id, row) for row in x])
    assert close(ys, whole) <= 1e-5
    assert client.snapshot(info.session_id)["h0"].shape == (16,)
    assert client.reset(info.session_id).steps == 0
    assert client.close_session(info.session_id).steps == 0


def test_client_chosen_session_ids(client: Client) -> None:
    chosen = "0123456789abcdef" * 2
    with client.stream() as stream:
        assert stream.open("echo", session_id=chosen).session_id == chosen
        with pytest.raises(RnnServeError) as err:
            stream.open("echo", session_id=chosen)
        assert err.value.code.name == "ALREADY_EXISTS"
        with pytest.raises(RnnServeError) as err:
            stream.open("echo", session_id="ABC")
        assert err.value.code.name == "INVALID_ARGUMENT"
        stream.close(chosen)
    assert len(client.open_session("echo").session_id) == 32  # the client picked it
