"""KServe v2 / Triton clients against rnnserve, with the official tritonclient[grpc] package."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from rnnserve.client import Client
from tests.conftest import RunningServer, running

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server():
    """Its own server: these tests count live sessions, which no other test may change."""
    with running() as own:
        yield own


@pytest.fixture
def triton(server: RunningServer):
    client = grpcclient.InferenceServerClient(url=server.address)
    yield client
    client.close()


def x_input(x: np.ndarray, name: str = "x"):
    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    return tensor


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / (1 + np.abs(b))))


def status_of(fn, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as err:
        fn(*args, **kwargs)
    assert err.value.message()
    return str(err.value.status())


def test_health_and_metadata(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("echo") and triton.is_model_ready("echo", "1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server.name == "rnnserve" and "sequence" in server.extensions
    meta = triton.get_model_metadata("binary_add")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["x"] == ("FP32", [-1, -1, 2]) and inputs["c1"] == ("FP32", [-1, 20])
    assert [t.name for t in meta.outputs] == ["y", "h0_out", "c0_out", "h1_out", "c1_out"]
    config = triton.get_model_config("echo").config
    assert config.sequence_batching.max_sequence_idle_microseconds == 300_000_000
    assert [s.input_name for s in config.sequence_batching.state] == ["h0"]
    index = triton.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {("echo", "1", "READY")}


def test_stateless_batch_equals_native_predict(triton, client: Client) -> None:
    x = np.random.default_rng(0).integers(0, 2, (16, 8, 2)).astype(np.float32)
    h0 = np.random.default_rng(1).uniform(-0.3, 0.3, (16, 20)).astype(np.float32)
    result = triton.infer("binary_add", [x_input(x), x_input(h0, "h0")])
    native = client.predict("binary_add", x, initial_states={"h0": h0})
    assert close(result.as_numpy("y"), native.y) <= 1e-5
    assert close(result.as_numpy("c1_out"), native.final_states["c1"]) <= 1e-5
    only_y = triton.infer(
        "binary_add", [x_input(x)], outputs=[grpcclient.InferRequestedOutput("y")]
    )
    assert only_y.as_numpy("h0_out") is None and only_y.as_numpy("y").shape == (16, 8, 1)


def test_unary_sequences_interleaved(triton, client: Client) -> None:
    rng = np.random.default_rng(2)
    xs = {seq: rng.uniform(320, 370, (6, 1)).astype(np.float32) for seq in (7, 8, "device-9")}
    got: dict = {seq: [] for seq in xs}
    for t in range(6):
        for seq, x in xs.items():
            result = triton.infer(
                "forecast",
                [x_input(x[t][None, None])],
                sequence_id=seq,
                sequence_start=(t == 0),
                sequence_end=(t == 5),
            )
            got[seq].append(result.as_numpy("y")[0])
    for seq, x in xs.items():
        whole = client.predict("forecast", x[None]).y[0]
        assert close(np.concatenate(got[seq]), whole) <= 1e-5
    assert (
        status_of(triton.infer, "forecast", [x_input(xs[7][:1][None])], sequence_id=7)
        == "StatusCode.INVALID_ARGUMENT"
    )  # ended above: not open any more


def test_streamed_sequences_interleaved(triton, server: RunningServer) -> None:
    bits = np.random.default_rng(3).integers(0, 2, (4, 40)).astype(np.float32)
    live_before = server.server.engine.live_sessions
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for t in range(bits.shape[1]):
            for seq in range(4):
                triton.async_stream_infer(
                    "echo",
                    [x_input(bits[seq, t].reshape(1, 1, 1))],
                    request_id=f"{seq}:{t}",
                    sequence_id=100 + seq,
                    sequence_start=(t == 0),
                    sequence_end=(t == bits.shape[1] - 1),
                )
        predicted = np.zeros(bits.shape, int)
        for _ in range(bits.size):
            result, error = responses.get(timeout=30)
            assert error is None, error
            seq, t = map(int, result.get_response().id.split(":"))
            predicted[seq, t] = result.as_numpy("y")[0, 0].argmax()
        triton.async_stream_infer("echo", [x_input(np.ones((1, 1, 1)))], sequence_id=999)
        result, error = responses.get(timeout=30)
        assert result is None and "sequence_start" in str(error)  # the stream lives on
        triton.async_stream_infer(
            "echo",
            [x_input(np.ones((1, 1, 1)))],
            sequence_id=5,
            sequence_start=True,
            sequence_end=True,
        )
        result, error = responses.get(timeout=30)
        assert error is None and result.as_numpy("y").shape == (1, 1, 2)
    finally:
        triton.stop_stream()
    assert np.array_equal(predicted[:, 3:], bits[:, :-3].astype(int))
    assert server.server.engine.live_sessions == live_before  # ended sequences freed sessions


def test_bad_requests(triton) -> None:
    x = np.zeros((1, 2, 1), np.float32)
    assert status_of(triton.infer, "nope", [x_input(x)]) == "StatusCode.NOT_FOUND"
    assert (
        status_of(triton.infer, "echo", [x_input(x)], model_version="9") == "StatusCode.NOT_FOUND"
    )
    assert (
        status_of(triton.infer, "echo", [x_input(np.zeros((1, 2, 3)))])
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert status_of(triton.infer, "echo", [x_input(x, "h0")]) == "StatusCode.INVALID_ARGUMENT"
    nan = np.full((1, 2, 1), np.nan, np.float32)
    assert status_of(triton.infer, "echo", [x_input(nan)]) == "StatusCode.INVALID_ARGUMENT"
    ints = grpcclient.InferInput("x", [1, 1, 1], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 1, 1), np.int32))
    assert status_of(triton.infer, "echo", [ints]) == "StatusCode.INVALID_ARGUMENT"
    assert (
        status_of(
            triton.infer, "echo", [x_input(np.zeros((2, 1, 1)))], sequence_id=3, sequence_start=True
        )
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert (
        status_of(
            triton.infer, "echo", [x_input(x)], outputs=[grpcclient.InferRequestedOutput("z")]
        )
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert status_of(triton.get_model_metadata, "nope") == "StatusCode.NOT_FOUND"
    assert triton.infer("echo", [x_input(x)]).as_numpy("y").shape == (1, 2, 2)


def test_sequences_share_the_native_session_store(server: RunningServer, triton) -> None:
    engine = server.server.engine
    before = engine.live_sessions
    triton.infer("echo", [x_input(np.ones((1, 1, 1)))], sequence_id=4242, sequence_start=True)
    assert engine.live_sessions == before + 1
    triton.infer("echo", [x_input(np.ones((1, 1, 1)))], sequence_id=4242, sequence_end=True)
    assert engine.live_sessions == before
