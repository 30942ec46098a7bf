"""Property-based fuzzing of both front doors: whatever a client sends, the answer is one of the
documented status codes with a message, and the server stays healthy and exact afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from tests.conftest import RunningServer, golden, running

DOCUMENTED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "ALREADY_EXISTS",
    "RESOURCE_EXHAUSTED",
}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

names = st.sampled_from(["echo", "digits", "forecast", "binary_add", "", "nope", "é" * 3])
dims = st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**31, 2**40, 2**62, 2**63 - 1]))
shapes = st.lists(dims, min_size=0, max_size=70)
floats = st.sampled_from([0.0, 1.0, -3.5, float("nan"), float("inf"), 1e38])


@st.composite
def tensors(draw) -> pb.Tensor:
    shape = draw(shapes)
    count = int(np.prod([d for d in shape if 0 <= d <= 5] or [0]))
    if draw(st.booleans()) and count <= 64:  # a consistent byte count, sometimes
        data = np.full(count, draw(floats), "<f4").tobytes()
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(datatype=draw(st.sampled_from([1, 1, 1, 0, 7])), shape=shape, data=data)


session_ids = st.one_of(st.just(""), st.text(max_size=40), st.sampled_from(["f" * 32, "0" * 32]))

predicts = st.builds(
    pb.PredictRequest,
    model=names,
    version=st.integers(-5, 2**63 - 1),
    x=tensors(),
    lengths=st.lists(st.integers(-2, 2**31 - 1), max_size=4),
    initial_states=st.dictionaries(st.sampled_from(["h0", "c0", "zz"]), tensors(), max_size=2),
    output_mode=st.integers(0, 5),
)
by_id = st.sampled_from(
    [
        pb.ResumeSessionRequest,
        pb.ResetSessionRequest,
        pb.GetSessionStateRequest,
        pb.CloseSessionRequest,
    ]
)
stream_requests = st.one_of(
    st.builds(
        lambda o: pb.StreamRequest(open=o),
        st.builds(
            pb.OpenSessionRequest, model=names, version=st.integers(-1, 3), session_id=session_ids
        ),
    ),
    st.builds(
        lambda s: pb.StreamRequest(step=s),
        st.builds(
            pb.StepRequest,
            session_ids=st.lists(session_ids, max_size=3),
            x=tensors(),
            same_sessions=st.booleans(),
        ),
    ),
    st.builds(
        lambda kind, session_id: pb.StreamRequest(
            **{
                {
                    pb.ResumeSessionRequest: "resume",
                    pb.ResetSessionRequest: "reset",
                    pb.GetSessionStateRequest: "get_state",
                    pb.CloseSessionRequest: "close",
                }[kind]: kind(session_id=session_id)
            }
        ),
        by_id,
        session_ids,
    ),
    st.just(pb.StreamRequest()),
)


@st.composite
def infer_requests(draw) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(
        model_name=draw(names),
        model_version=draw(st.sampled_from(["", "1", "²", "-1", "9" * 30, "1.0"])),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = draw(tensors())
        request.inputs.add(
            name=draw(st.sampled_from(["x", "h0", "c0", "y", ""])),
            datatype=draw(st.sampled_from(["FP32", "INT64", "BYTES", ""])),
            shape=tensor.shape,
        )
        if raw:
            request.raw_input_contents.append(tensor.data)
        else:
            request.inputs[-1].contents.fp32_contents.extend(
                np.frombuffer(tensor.data[: len(tensor.data) // 4 * 4], "<f4").tolist()
            )
    for key in draw(
        st.lists(st.sampled_from(["sequence_id", "sequence_start", "sequence_end"]), max_size=3)
    ):
        kind = draw(st.sampled_from(["int64_param", "bool_param", "string_param", "double_param"]))
        value = {
            "int64_param": draw(st.integers(-(2**63), 2**63 - 1)),
            "bool_param": draw(st.booleans()),
            "string_param": draw(st.text(max_size=300)),
            "double_param": draw(st.floats(allow_nan=True)),
        }[kind]
        setattr(request.parameters[key], kind, value)
    return request


@pytest.fixture(scope="module")
def server() -> RunningServer:
    """Its own server: fuzzed opens leave sessions (even with chosen ids) behind."""
    with running() as fuzzed:
        yield fuzzed


def status_of(call) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.details(), "every refusal says why"
        return exc.code().name
    return "OK"


def unary(channel: grpc.Channel, path: str, response) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


def assert_healthy(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=5)
            .status
        )
    assert status == health_pb2.HealthCheckResponse.SERVING
    data = golden("echo")
    with server.client() as client:
        y = client.predict("echo", data["x"], initial_states={"h0": data["h0"]}).y
    assert np.max(np.abs(y - data["expected_y"])) <= 1e-5


@FUZZ
@given(request=predicts)
def test_native_predict(server: RunningServer, request: pb.PredictRequest) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = unary(channel, "/rnnserve.v1.Inference/Predict", pb.PredictResponse)
        assert status_of(lambda: call(request, timeout=10)) in DOCUMENTED


@FUZZ
@given(messages=st.lists(stream_requests, min_size=1, max_size=6))
def test_native_stream(server: RunningServer, messages: list[pb.StreamRequest]) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/rnnserve.v1.Inference/Stream",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.StreamResponse.FromString,
        )
        responses = list(call(iter(messages), timeout=10))
    assert len(responses) == len(messages)  # a bad message never ends the stream
    for response in responses:
        if response.WhichOneof("kind") == "error":
            assert grpc.StatusCode(_by_value(response.error.code)).name in DOCUMENTED
            assert response.error.message


def _by_value(code: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == code)


@FUZZ
@given(request=infer_requests())
def test_v2_infer(server: RunningServer, request: v2.ModelInferRequest) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = unary(channel, "/inference.GRPCInferenceService/ModelInfer", v2.ModelInferResponse)
        assert status_of(lambda: call(request, timeout=10)) in DOCUMENTED


@FUZZ
@given(
    data=st.binary(max_size=64),
    method=st.sampled_from(
        [
            "/rnnserve.v1.Inference/Predict",
            "/rnnserve.v1.Inference/Step",
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ModelReady",
            "/grpc.health.v1.Health/Check",
        ]
    ),
)
def test_raw_bytes(server: RunningServer, data: bytes, method: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(method)
        assert status_of(lambda: call(data, timeout=10)) in DOCUMENTED


def test_server_is_healthy_and_exact_after_fuzzing(server: RunningServer) -> None:
    assert_healthy(server)
    codes = {
        sample.labels["code"]
        for metric in server.server.engine.metrics.registry.collect()
        if metric.name == "rnnserve_requests"
        for sample in metric.samples
    }
    assert "INVALID_ARGUMENT" in codes and not codes - DOCUMENTED - {"UNAVAILABLE"}
