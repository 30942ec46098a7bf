"""Every bad input gets a clear status; nothing a client does disturbs anyone else."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnserve.client import Client, RnnServeError
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from tests.conftest import FakeClock, RunningServer, running


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(RnnServeError) as err:
        fn(*args, **kwargs)
    assert err.value.message  # always a message a user can act on
    return err.value.code.name


def test_unknown_model_version_and_session(client: Client) -> None:
    x = np.zeros((1, 1, 1), np.float32)
    assert code_of(client.predict, "nope", x) == "NOT_FOUND"
    assert code_of(client.predict, "echo", x, version=99) == "NOT_FOUND"
    assert code_of(client.get_model, "nope") == "NOT_FOUND"
    assert code_of(client.open_session, "") == "NOT_FOUND"
    assert code_of(client.step, "f" * 32, [1.0]) == "NOT_FOUND"
    assert code_of(client.reset, "f" * 32) == "NOT_FOUND"
    assert code_of(client.snapshot, "bad id") == "INVALID_ARGUMENT"
    with client.stream() as stream:
        assert code_of(stream.resume, "f" * 32) == "NOT_FOUND"


@pytest.mark.parametrize(
    "x, why",
    [
        (np.zeros((1, 4, 3), np.float32), "wrong feature count"),
        (np.zeros((1, 0, 1), np.float32), "empty sequence"),
        (np.zeros((0, 3, 1), np.float32), "empty batch"),
        (np.zeros((4, 1), np.float32), "rank 2"),
        (np.array([[[np.nan]]], np.float32), "NaN"),
        (np.array([[[np.inf]]], np.float32), "Inf"),
    ],
)
def test_bad_predict_inputs(client: Client, x: np.ndarray, why: str) -> None:
    assert code_of(client.predict, "echo", x) == "INVALID_ARGUMENT", why


def raw_predict(server: RunningServer, request: pb.PredictRequest) -> str:
    """The status of a Predict built by hand (wire-format mistakes the client never makes)."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            rpc.InferenceStub(channel).Predict(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.details()
            return exc.code().name
    return "OK"


def test_bad_lengths_states_and_wire_format(server: RunningServer, client: Client) -> None:
    x = np.zeros((2, 3, 1), np.float32)
    fp32 = pb.DATA_TYPE_FP32
    short = pb.Tensor(datatype=fp32, shape=[2, 3, 1], data=b"\0" * 7)
    assert raw_predict(server, pb.PredictRequest(model="echo", x=short)) == "INVALID_ARGUMENT"
    for datatype in (pb.DATA_TYPE_UNSPECIFIED, 99):  # bytes alone do not say what they hold
        untyped = pb.Tensor(datatype=datatype, shape=[2, 3, 1], data=x.tobytes())
        assert raw_predict(server, pb.PredictRequest(model="echo", x=untyped)) == "INVALID_ARGUMENT"
    whole = pb.Tensor(datatype=fp32, shape=[2, 3, 1], data=x.tobytes())
    assert raw_predict(server, pb.PredictRequest(model="echo", x=whole)) == "OK"
    assert (
        raw_predict(server, pb.PredictRequest(model="echo", x=whole, lengths=[3, 4]))
        == "INVALID_ARGUMENT"
    )
    assert (
        code_of(client.predict, "echo", x, initial_states={"h9": np.zeros((2, 4))})
        == "INVALID_ARGUMENT"
    )
    assert (
        code_of(client.predict, "echo", x, initial_states={"h0": np.zeros((2, 5))})
        == "INVALID_ARGUMENT"
    )
    assert (
        code_of(client.predict, "echo", x, initial_states={"h0": np.full((2, 4), np.nan)})
        == "INVALID_ARGUMENT"
    )


def test_bad_stream_messages_keep_the_stream_alive(client: Client) -> None:
    with client.stream("echo") as stream:
        assert code_of(stream.step, [1.0, 2.0]) == "INVALID_ARGUMENT"
        assert code_of(stream.step, [float("nan")]) == "INVALID_ARGUMENT"
        assert code_of(stream.send, pb.StreamRequest(), "error") == "INVALID_ARGUMENT"
        assert code_of(stream.open, "nope") == "NOT_FOUND"
        assert (
            code_of(stream.step_many, ["a" * 32, "a" * 32], np.zeros((1, 1, 1)))
            == "INVALID_ARGUMENT"
        )
        duplicate = stream.step_many([stream.session.session_id] * 2, np.zeros((2, 1, 1)))
        assert duplicate.errors[1].code.name == "INVALID_ARGUMENT"
        assert stream.step([1.0]).shape == (1, 2)  # still serving after all of that


def test_oversize_requests(server: RunningServer) -> None:
    with (
        running(max_timesteps=16, max_batch_rows=4, max_message_bytes=4096) as small,
        small.client() as client,
    ):
        assert code_of(client.predict, "echo", np.zeros((1, 17, 1))) == "INVALID_ARGUMENT"
        assert code_of(client.predict, "echo", np.zeros((5, 2, 1))) == "INVALID_ARGUMENT"
        assert client.predict("echo", np.zeros((4, 16, 1))).y.shape == (4, 16, 2)  # at the limits
        # 4 x 16 x 80 floats = 20 KB > --max-message-bytes: gRPC itself refuses it
        assert code_of(client.predict, "digits", np.zeros((4, 16, 80))) == "RESOURCE_EXHAUSTED"
        session = client.open_session("echo").session_id
        assert code_of(client.step, session, np.zeros((17, 1))) == "INVALID_ARGUMENT"


def test_max_sessions_and_idle_eviction() -> None:
    clock = FakeClock()
    with (
        running(max_sessions=3, session_idle_timeout=60, clock=clock) as srv,
        srv.client() as client,
    ):
        ids = [client.open_session("echo").session_id for _ in range(3)]
        assert code_of(client.open_session, "echo") == "RESOURCE_EXHAUSTED"
        # more ids than can ever be live here: refused whole, none looked for
        with pytest.raises(RnnServeError, match=r"names 4 sessions.*--max-sessions \(3\)"):
            client.step_many([*ids, "0" * 32], np.zeros((4, 1, 1)))
        assert client.step_many(ids, np.zeros((3, 1, 1))).steps == [1, 1, 1]
        client.close_session(ids[0])
        ids[0] = client.open_session("echo").session_id
        clock.advance(59)
        client.step(ids[0], [1.0])  # a step keeps its session alive
        assert srv.sweep() == 0
        clock.advance(2)
        assert srv.sweep() == 2
        assert srv.server.engine.live_sessions == 1
        assert code_of(client.step, ids[1], [1.0]) == "FAILED_PRECONDITION"
        with pytest.raises(RnnServeError, match="evicted after 60 s idle"):
            client.step(ids[2], [1.0])
        client.open_session("echo")  # slots came back


def test_a_client_killed_mid_stream_disturbs_nobody(server: RunningServer, client: Client) -> None:
    bits = np.random.default_rng(0).integers(0, 2, 60).astype(np.float32)
    with client.stream("echo") as survivor:
        victims = [client.stream("echo") for _ in range(5)]
        for i, bit in enumerate(bits):
            if i == 20:
                for v in victims:
                    v.step([1.0])
                    v.cancel()
            assert int(survivor.step([bit]).argmax()) == (int(bits[i - 3]) if i >= 3 else 0)
    assert client.list_models()


def test_auth_token_and_open_health() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running(auth_token="s3cret") as srv:
        with srv.client() as anonymous:
            assert code_of(anonymous.list_models) == "UNAUTHENTICATED"
            with anonymous.stream() as stream:
                assert code_of(stream.open, "echo") == "UNAUTHENTICATED"
        with srv.client(token="wrong") as wrong:
            assert code_of(wrong.list_models) == "UNAUTHENTICATED"
        with srv.client(token="s3cret") as right:
            assert len(right.list_models()) == 4
            with right.stream("echo") as stream:
                assert stream.step([1.0]).shape == (1, 2)
        with grpc.insecure_channel(srv.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert (
                check(health_pb2.HealthCheckRequest(service="echo")).status
                == health_pb2.HealthCheckResponse.SERVING
            )
