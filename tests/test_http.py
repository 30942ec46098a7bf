"""The KServe v2 HTTP/REST door against the official tritonclient[http] package, raw HTTP and
hostile bodies: the same sessions, errors and limits as the gRPC doors."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, running

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "s3cret-http"
STATUSES = {200, 400, 401, 404, 409, 413, 429, 503, 504}
"""Every status the door documents (docs/http.md)."""


@pytest.fixture(scope="module")
def server():
    """A small --max-message-bytes and --read-timeout, so the limits are cheap to reach."""
    with running(http_port=0, max_message_bytes=1 << 20, read_timeout=1.0) as own:
        yield own


@pytest.fixture
def url(server: RunningServer) -> str:
    return f"127.0.0.1:{server.server.http_port}"


@pytest.fixture
def triton(url: str):
    client = httpclient.InferenceServerClient(url=url)
    yield client
    client.close()


def x_input(module, x: np.ndarray, name: str = "x", binary: bool = True):
    tensor = module.InferInput(name, list(x.shape), "FP32")
    if module is httpclient:
        tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    return tensor


def post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{url}{path}", data=body, headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{url}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_health_metadata_config_and_index(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("echo") and triton.is_model_ready("echo", "1")
    assert not triton.is_model_ready("nope")
    assert "sequence" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata("binary_add", "1")
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs["x"] == ("FP32", [-1, -1, 2]) and inputs["c1"] == ("FP32", [-1, 20])
    config = triton.get_model_config("echo")
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 300_000_000
    assert [s["input_name"] for s in config["sequence_batching"]["state"]] == ["h0"]
    index = triton.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {("echo", "1", "READY")}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_batch_equals_native_predict_exactly(triton, server: RunningServer, binary: bool) -> None:
    x = np.random.default_rng(0).integers(0, 2, (16, 8, 2)).astype(np.float32)
    h0 = np.random.default_rng(1).uniform(-0.3, 0.3, (16, 20)).astype(np.float32)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("y", "c1_out")]
    result = triton.infer(
        "binary_add",
        [x_input(httpclient, x, binary=binary), x_input(httpclient, h0, "h0", binary=binary)],
        outputs=outputs,
    )
    with server.client() as client:
        native = client.predict("binary_add", x, initial_states={"h0": h0})
    assert np.array_equal(result.as_numpy("y"), native.y)
    assert np.array_equal(result.as_numpy("c1_out"), native.final_states["c1"])
    assert result.as_numpy("h0_out") is None


def test_a_sequence_started_over_grpc_continues_over_http(triton, server: RunningServer) -> None:
    """Both doors derive a sequence's session from (client, model, sequence id): steps may
    alternate between them, and the outputs are the whole sequence's."""
    x = np.random.default_rng(2).uniform(320, 370, (8, 1)).astype(np.float32)
    grpc_side = grpcclient.InferenceServerClient(url=server.address)
    got = []
    try:
        for t in range(8):
            module, client = (grpcclient, grpc_side) if t % 3 == 0 else (httpclient, triton)
            result = client.infer(
                "forecast",
                [x_input(module, x[t][None, None])],
                sequence_id="walk-7",
                sequence_start=t == 0,
                sequence_end=t == 7,
            )
            got.append(result.as_numpy("y")[0])
    finally:
        grpc_side.close()
    with server.client() as native:
        whole = native.predict("forecast", x[None]).y[0]
    assert np.array_equal(np.concatenate(got), whole)


def test_the_docs_curl_body_and_errors(url: str) -> None:
    body = {
        "inputs": [{"name": "x", "shape": [1, 3, 1], "datatype": "FP32", "data": [1, 0, 1]}],
        "outputs": [{"name": "y"}],
    }
    status, answer = post(url, "/v2/models/echo/infer", json.dumps(body).encode())
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 3, 2]
    cases = [
        (b"{not json", 400, "not a JSON object"),
        (b'{"inputs": 3}', 400, "inputs must be a list"),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "INT32", "data": [1]}]}',
            400,
            "rnnserve models take FP32",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 2, 1], "datatype": "FP32", "data": [1]}]}',
            400,
            "needs 2 values, got 1",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": ["1"]}]}',
            400,
            "numbers only",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [1]}],'
            b' "outputs": [{"name": "nope"}]}',
            400,
            "unknown output nope",
        ),
        (b'{"inputs": []}', 400, "input 'x'"),
    ]
    for raw, want, text in cases:
        status, answer = post(url, "/v2/models/echo/infer", raw)
        assert (status, text in answer["error"]) == (want, True), (raw, answer)
    status, answer = post(url, "/v2/models/nope/infer", b"{}")
    assert status == 404 and answer["error"].startswith("NOT_FOUND")
    status, answer = get(url, "/v2/models/echo/versions/x1")
    assert status == 400 and "version number" in answer["error"]
    status, answer = get(url, "/v2/models/echo/infer")
    assert status == 405 and "GET /v2/models/echo/infer is not an endpoint" in answer["error"]
    assert get(url, "/v1/anything")[0] == 404
    for raw, want in ((b"", 200), (b'{"ready": true}', 200), (b"[1]", 400), (b"{", 400)):
        status, answer = post(url, "/v2/repository/index", raw)
        assert status == want, (raw, answer)
    status, answer = post(url, "/v2/repository/index", b'{"ready": "yes"}')
    assert status == 400 and "ready must be true or false" in answer["error"]


def test_binary_sizes_are_checked_against_the_body(url: str) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    data = np.ones(2, np.float32).tobytes()
    length = {"Inference-Header-Content-Length": str(len(header))}
    status, _ = post(url, "/v2/models/echo/infer", header + data, length)
    assert status == 200
    status, answer = post(url, "/v2/models/echo/infer", header + data[:4], length)
    assert status == 400 and "runs past the end" in answer["error"]
    status, answer = post(url, "/v2/models/echo/infer", header + data + b"xx", length)
    assert status == 400 and "2 bytes after the tensors" in answer["error"]
    long = {"Inference-Header-Content-Length": str(len(header) + 99)}
    status, answer = post(url, "/v2/models/echo/infer", header + data, long)
    assert status == 400 and "Inference-Header-Content-Length" in answer["error"]


def test_a_body_over_the_message_limit_is_413(url: str) -> None:
    status, answer = post(url, "/v2/models/echo/infer", b" " * ((1 << 20) + 1))
    assert status == 413 and "--max-message-bytes" in answer["error"]


def test_a_slow_body_gets_504_and_others_go_on(url: str, triton) -> None:
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"'
        )
        started = time.monotonic()
        assert triton.is_server_ready()  # meanwhile
        answer = slow.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 504") and "--read-timeout" in answer
    assert time.monotonic() - started < 5


def test_tokens_guard_every_call_but_health() -> None:
    with running(http_port=0, auth_token=TOKEN) as own:
        url = f"127.0.0.1:{own.server.http_port}"
        assert get(url, "/v2/health/ready")[0] == 200
        status, answer = get(url, "/v2/models/echo")
        assert status == 401 and "bearer token" in answer["error"]
        assert get(url, "/v2/models/echo", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        triton = httpclient.InferenceServerClient(url=url)
        with pytest.raises(InferenceServerException) as err:
            triton.infer("echo", [x_input(httpclient, np.ones((1, 1, 1)))])
        assert err.value.status() == "401"
        result = triton.infer(
            "echo",
            [x_input(httpclient, np.ones((1, 1, 1)))],
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert result.as_numpy("y").shape == (1, 1, 2)
        triton.close()


def test_calls_are_counted_under_their_door(url: str, server: RunningServer) -> None:
    sample = server.server.engine.metrics.registry.get_sample_value
    labels = {
        "model": "echo",
        "version": "1",
        "method": "http/ModelInfer",
        "code": "OK",
        "client": "",
    }
    before = sample("rnnserve_requests_total", labels) or 0
    body = b'{"inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [1]}]}'
    assert post(url, "/v2/models/echo/infer", body)[0] == 200
    assert sample("rnnserve_requests_total", labels) == before + 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "h0", "y", ""]),
        "shape": st.lists(st.integers(-2, 4), max_size=4) | JSON_VALUES,
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES"]) | JSON_VALUES,
        "data": st.lists(st.floats(width=32) | st.integers(), max_size=12) | JSON_VALUES,
    }
)
BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, max_size=3) | JSON_VALUES},
    optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": JSON_VALUES}), max_size=2),
        "parameters": st.dictionaries(
            st.sampled_from(["sequence_id", "sequence_start", "binary_data_output"]),
            JSON_VALUES,
        ),
    },
).map(lambda doc: json.dumps(doc).encode()) | st.binary(max_size=64)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES, model=st.sampled_from(["echo", "forecast", "nope"]))
def test_any_body_gets_a_documented_status_and_one_line(url: str, body: bytes, model: str) -> None:
    status, answer = post(url, f"/v2/models/{model}/infer", body)
    assert status in STATUSES, (status, answer)
    if status != 200:
        assert set(answer) == {"error"} and "\n" not in answer["error"]
        assert not answer["error"].startswith("INTERNAL"), answer


def test_a_sequence_ended_over_http_frees_its_session(server: RunningServer, url: str) -> None:
    """A sequence ended over HTTP frees its session like one ended over gRPC."""
    live = server.server.engine.live_sessions
    body = {
        "inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [1]}],
        "parameters": {"sequence_id": 4242, "sequence_start": True, "sequence_end": True},
    }
    assert post(url, "/v2/models/echo/infer", json.dumps(body).encode())[0] == 200
    assert server.server.engine.live_sessions == live
