"""`rnnserve import`: graphs built the way PyTorch's torch.onnx.export writes nn.LSTM, nn.GRU and
nn.RNN (time-major or batch_first with Transposes around the op, states stacked [layers, batch,
hidden] named h0/c0, outputs output/hn/cn), imported, served, and checked over the wire against
the original graph run directly in ONNX Runtime; and the graphs it must refuse.

(torch itself is not in the test environment: its wheel is gigabytes. The graphs below use the
same operators, attributes, names and layouts its TorchScript exporter writes; what torch's
exporters write today is committed and served in tests/test_torch_exports.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rnnserve.client import RnnServeError
from rnnserve.models.importer import ImportRefused, import_graph
from tests.conftest import running

OPSET = 17
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RNG = np.random.default_rng(11)


def _weights(name: str, shape: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(
        name,
        TensorProto.FLOAT,
        shape,
        (0.4 * RNG.standard_normal(shape)).astype(np.float32).ravel(),
    )


def _axes(name: str, axis: int) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [1], [axis])


def torch_like(
    op: str,
    layers: int = 1,
    features: int = 3,
    hidden: int = 5,
    outputs: int = 2,
    batch_first: bool = False,
    with_states: bool = True,
    direction: str = "forward",
    head: bool = True,
    last_only: bool = False,
    fixed: bool = False,
    wide: int = 0,
) -> bytes:
    """An nn.LSTM/GRU/RNN (+ nn.Linear head, with a hidden layer `wide` units wide before
    it when given) as torch.onnx.export writes it."""
    directions = 2 if direction == "bidirectional" else 1
    seq, batch = ("seq", "batch") if not fixed else (7, 1)
    shape = [batch, seq, features] if batch_first else [seq, batch, features]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    init = [_axes("zero", 0), _axes("one", 1)]
    nodes = []
    x = "input"
    if batch_first:
        nodes.append(helper.make_node("Transpose", ["input"], ["x_tm"], perm=[1, 0, 2]))
        x = "x_tm"
    kinds = ["h", "c"] if op == "LSTM" else ["h"]
    if with_states:
        for k in kinds:
            inputs.append(
                helper.make_tensor_value_info(
                    f"{k}0", TensorProto.FLOAT, [layers * directions, batch, hidden]
                )
            )
    finals: dict[str, list[str]] = {k: [] for k in kinds}
    size = features
    for layer in range(layers):
        g = GATES[op]
        init += [
            _weights(f"W{layer}", [directions, g * hidden, size]),
            _weights(f"R{layer}", [directions, g * hidden, hidden]),
            _weights(f"B{layer}", [directions, 2 * g * hidden]),
            helper.make_tensor(f"start{layer}", TensorProto.INT64, [1], [layer]),
            helper.make_tensor(f"end{layer}", TensorProto.INT64, [1], [layer + 1]),
        ]
        states = []
        for k in kinds:
            if with_states:
                nodes.append(
                    helper.make_node(
                        "Slice",
                        [f"{k}0", f"start{layer}", f"end{layer}", "zero"],
                        [f"{k}0_{layer}"],
                    )
                )
                states.append(f"{k}0_{layer}")
            else:
                states.append("")
        extra = {"linear_before_reset": 1} if op == "GRU" else {}
        outs = [f"Y{layer}", *(f"{k}n_{layer}" for k in kinds)]
        nodes.append(
            helper.make_node(
                op,
                [x, f"W{layer}", f"R{layer}", f"B{layer}", "", *states],
                outs,
                hidden_size=hidden,
                direction=direction,
                name=f"{op}_{layer}",
                **extra,
            )
        )
        for k in kinds:
            finals[k].append(f"{k}n_{layer}")
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "one"], [f"X{layer + 1}"]))
        x, size = f"X{layer + 1}", hidden
    out = x
    if wide:
        init.append(_weights("Wwide", [size, wide]))
        nodes += [
            helper.make_node("MatMul", [x, "Wwide"], ["wide_mm"]),
            helper.make_node("Relu", ["wide_mm"], ["wide_out"]),
        ]
        x = "wide_out"
    if head:
        init += [_weights("Wout", [wide or hidden, outputs]), _weights("bout", [outputs])]
        nodes += [
            helper.make_node("MatMul", [x, "Wout"], ["mm"]),
            helper.make_node("Add", ["mm", "bout"], ["head"]),
        ]
        out, size = "head", outputs
    if last_only:
        init.append(helper.make_tensor("last", TensorProto.INT64, [], [-1]))
        nodes.append(helper.make_node("Gather", [out, "last"], ["output"], axis=0))
        out_shape = [batch, size]
    elif batch_first:
        nodes.append(helper.make_node("Transpose", [out], ["output"], perm=[1, 0, 2]))
        out_shape = [batch, seq, size]
    else:
        nodes.append(helper.make_node("Identity", [out], ["output"]))
        out_shape = [seq, batch, size]
    outputs_ = [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)]
    if with_states:
        for k in kinds:
            nodes.append(helper.make_node("Concat", finals[k], [f"{k}n"], axis=0))
            outputs_.append(
                helper.make_tensor_value_info(
                    f"{k}n", TensorProto.FLOAT, [layers * directions, batch, hidden]
                )
            )
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs_, init)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="pytorch",
        producer_version="2.15.0",
    )
    model.ir_version = 8
    return model.SerializeToString()


def save(tmp_path: Path, graph: bytes, name: str = "graph.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(graph)
    return path


def original(
    graph: bytes, x_btf: np.ndarray, batch_first: bool, states: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    feeds = {"input": x_btf if batch_first else x_btf.transpose(1, 0, 2), **states}
    answer = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
    )
    if not batch_first:
        answer["output"] = answer["output"].transpose(1, 0, 2)
    return answer


CASES = {
    "2-layer LSTM, time-major, h0/c0 [2, batch, hidden]": dict(op="LSTM", layers=2),
    "GRU, batch_first (Transposes around the op)": dict(op="GRU", batch_first=True),
    "3-layer RNN, no state inputs or outputs": dict(
        op="RNN", layers=3, with_states=False, head=False
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_serves_what_the_original_computes(tmp_path: Path, case: str) -> None:
    kwargs = CASES[case]
    graph = torch_like(**kwargs)
    repo = tmp_path / "repo"
    written = import_graph(save(tmp_path, graph), "mine", 1, repo)
    assert sorted(p.name for p in written.iterdir()) == ["golden.npz", "model.json", "model.onnx"]
    layers, kinds = kwargs.get("layers", 1), ["h", "c"] if kwargs["op"] == "LSTM" else ["h"]
    batch_first = kwargs.get("batch_first", False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 9, 3)).astype(np.float32)
    stacked = (
        {f"{k}0": (0.5 * rng.standard_normal((layers, 4, 5))).astype(np.float32) for k in kinds}
        if kwargs.get("with_states", True)
        else {}
    )
    expected = original(graph, x, batch_first, stacked)
    # The stacked [layers, batch, hidden] states, one [batch, hidden] tensor per layer.
    per_layer = {
        f"{k}{layer}": stacked[f"{k}0"][layer] for k in kinds for layer in range(layers) if stacked
    }
    with running(repository=repo) as srv, srv.client() as client:
        model = client.get_model("mine")
        assert [s.name for s in model.states] == [
            f"{k}{layer}" for layer in range(layers) for k in kinds
        ]
        whole = client.predict("mine", x, initial_states=per_layer)
        assert np.max(np.abs(whole.y - expected["output"])) <= 1e-5
        for k in kinds if stacked else []:
            finals = np.stack([whole.final_states[f"{k}{layer}"] for layer in range(layers)])
            assert np.max(np.abs(finals - expected[f"{k}n"])) <= 1e-5
        with client.stream(
            "mine", initial_states={n: v[:1] for n, v in per_layer.items()}
        ) as stream:
            streamed = np.concatenate([stream.step(x[0, t]) for t in range(9)])
        assert np.max(np.abs(streamed - expected["output"][0])) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(op="LSTM", direction="bidirectional"), "runs bidirectional"),
        (dict(op="GRU", direction="reverse"), "runs reverse"),
        (dict(op="LSTM", last_only=True), "needs one output per timestep"),
        (dict(op="GRU", fixed=True), "fixed batch or time sizes [7, 1, 3]"),
    ],
)
def test_unservable_graphs_are_refused_and_nothing_is_written(
    tmp_path: Path, kwargs: dict, reason: str
) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(ImportRefused, match=reason.replace("[", r"\[").replace("]", r"\]")):
        import_graph(save(tmp_path, torch_like(**kwargs)), "mine", 1, repo)
    assert not any(repo.rglob("*")) if repo.exists() else True


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", ".hidden", "", "x" * 129])
def test_a_name_that_is_no_directory_of_the_repository_is_refused_first(
    tmp_path: Path, name: str
) -> None:
    repo = tmp_path / "inside" / "repo"
    graph = save(tmp_path, torch_like("GRU"))
    with pytest.raises(ImportRefused, match="--name: .* is not a model name"):
        import_graph(graph, name, 1, repo)
    assert not repo.exists() and sorted(p.name for p in tmp_path.rglob("*")) == [graph.name]


def test_a_wide_layer_inside_an_imported_graph_is_costed(tmp_path: Path) -> None:
    """model.json says RNN(4) -> 1 output; a 4,096-wide hidden layer between them holds 32 KiB
    per row-timestep. Costed from the graph's own tensors, a Predict whose one row could never
    fit the budget is refused instead of running far past it."""
    repo = tmp_path / "repo"
    import_graph(
        save(tmp_path, torch_like("RNN", features=1, hidden=4, outputs=1, wide=4096)),
        "wide",
        1,
        repo,
    )
    with running(repository=repo, memory_budget=16 * 2**20) as srv, srv.client() as client:
        cost = srv.server.engine._registry.get("wide", 1).cost
        assert cost.per_step >= 2 * 4096 * 4  # the MatMul's and the Relu's outputs
        assert client.predict("wide", np.ones((4, 50, 1), np.float32)).y.shape == (4, 50, 1)
        with pytest.raises(RnnServeError) as err:  # one row: 1,000 x 32 KiB > 16 MiB
            client.predict("wide", np.ones((1, 1000, 1), np.float32))
        assert err.value.code.name == "RESOURCE_EXHAUSTED"


def test_a_graph_without_recurrence_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", "t", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", "t", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(ImportRefused, match="no recurrent operator"):
        import_graph(save(tmp_path, model.SerializeToString()), "mine", 1, tmp_path / "repo")
    with pytest.raises(ImportRefused, match="not a valid ONNX model"):
        import_graph(save(tmp_path, b"not onnx at all", "junk.onnx"), "mine", 1, tmp_path)


def test_the_command(tmp_path: Path) -> None:
    """`rnnserve import` writes the version and says what it wrote; a refusal is one line,
    exit status 2, and an existing version is never overwritten."""
    graph = save(tmp_path, torch_like("LSTM", layers=2))

    def command(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "rnnserve",
                "import",
                str(graph),
                "--name",
                "mine",
                "--repository",
                str(tmp_path / "repo"),
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = command()
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "states h0, c0, h1, c1" in done.stdout
    assert "onnxruntime" not in done.stderr, "the probe's failed layout try is not printed"
    again = command()
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: cannot import {graph}: {tmp_path / 'repo' / 'mine' / '1'} already exists; "
        "pick another --version"
    ]
    wrong = command("--version", "2", "--batch-first")  # the graph is time-major
    assert wrong.returncode == 2 and "does not run as a" in wrong.stderr
    assert "as [batch, time, 3]: " in wrong.stderr and "--time-major" in wrong.stderr
    assert not (tmp_path / "repo" / "mine" / "2").exists()


def test_the_fingerprint_covers_external_data(tmp_path: Path) -> None:
    """A graph saved with its weights in a file beside it: the recorded sha256 covers that file
    too (it covered the .onnx alone, so new weights went unnoticed), and the model serves."""
    import hashlib

    model = onnx.load_from_string(torch_like("GRU"))
    for index, tensor in enumerate(model.graph.initializer):  # raw bytes: what is moved out
        model.graph.initializer[index].CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
        )
    graph = tmp_path / "gru.onnx"
    onnx.save_model(
        model, str(graph), save_as_external_data=True, location="gru.data", size_threshold=0
    )
    first = json.loads(
        (import_graph(graph, "mine", 1, tmp_path / "repo") / "model.json").read_text()
    )["imported"]
    assert first["external_data"] == ["gru.data"]
    assert (
        first["sha256"]
        == hashlib.sha256(graph.read_bytes() + (tmp_path / "gru.data").read_bytes()).hexdigest()
    )
    weights = bytearray((tmp_path / "gru.data").read_bytes())
    weights[-4:] = np.float32(0.5).tobytes()
    (tmp_path / "gru.data").write_bytes(bytes(weights))  # the same .onnx, other weights
    second = json.loads(
        (import_graph(graph, "mine", 2, tmp_path / "repo") / "model.json").read_text()
    )["imported"]
    assert second["sha256"] != first["sha256"]
    with running(repository=tmp_path / "repo") as srv, srv.client() as client:
        assert client.predict("mine", np.ones((1, 4, 3), np.float32), version=2).y.shape == (
            1,
            4,
            2,
        )


def tf2onnx_like_loop(features: int = 3, units: int = 4) -> bytes:
    """A Keras SimpleRNN as tf2onnx writes it: batch-first x, a Loop over time whose body
    gathers step t and carries h [batch, units] (zeros built from x's shape), the steps
    stacked as its scan output."""
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x_tm", "t"], ["x_t"], axis=0),
            helper.make_node("MatMul", ["x_t", "W"], ["xw"]),
            helper.make_node("MatMul", ["h_in", "R"], ["hr"]),
            helper.make_node("Add", ["xw", "hr"], ["s"]),
            helper.make_node("Add", ["s", "b"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["h_out"], ["scan"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("t", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", units]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", units]),
            helper.make_tensor_value_info("scan", TensorProto.FLOAT, ["batch", units]),
        ],
    )
    init = [
        _weights("W", [features, units]),
        _weights("R", [units, units]),
        _weights("b", [units]),
        _weights("Wout", [units, 1]),
        helper.make_tensor("true", TensorProto.BOOL, [], [True]),
        helper.make_tensor("units", TensorProto.INT64, [1], [units]),
        helper.make_tensor("zero_i", TensorProto.INT64, [1], [0]),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_tm"], perm=[1, 0, 2]),
        helper.make_node("Shape", ["x_tm"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_i"], ["trips"], axis=0),
        helper.make_node("Squeeze", ["trips", "zero_i"], ["trip"]),
        helper.make_node("Shape", ["input"], ["shape_b"]),
        helper.make_node("Gather", ["shape_b", "zero_i"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "units"], ["h_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["h_shape"],
            ["h_zero"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]),
        ),
        helper.make_node(
            "Loop", ["trip", "true", "h_zero"], ["h_last", "ys"], body=body, name="while_loop"
        ),
        helper.make_node("Transpose", ["ys"], ["ys_bf"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["ys_bf", "Wout"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__1", "unk__2", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["unk__1", "unk__2", 1])],
        init,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="tf2onnx",
        producer_version="1.17.0",
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_a_loop_recurrence_is_served_as_it_is(tmp_path: Path) -> None:
    """tf2onnx's Loop export: its carried state becomes h0, with a warning about speed."""
    graph = tf2onnx_like_loop()
    repo = tmp_path / "repo"
    written = import_graph(save(tmp_path, graph), "keras_loop", 1, repo)
    spec = (written / "model.json").read_text()
    assert '"cell": "loop"' in spec and "generic Loop" in spec
    x = np.random.default_rng(2).standard_normal((2, 6, 3)).astype(np.float32)
    expected = original(graph, x, batch_first=True, states={})["output"]
    with running(repository=repo) as srv, srv.client() as client:
        assert [s.name for s in client.get_model("keras_loop").states] == ["h0"]
        assert np.max(np.abs(client.predict("keras_loop", x).y - expected)) <= 1e-5
        with client.stream("keras_loop") as stream:
            streamed = np.concatenate([stream.step(x[1, t]) for t in range(6)])
        assert np.max(np.abs(streamed - expected[1])) <= 1e-5


def scan_rnn(features: int = 2, units: int = 3) -> bytes:
    """A hand-written time-major SimpleRNN as an ONNX Scan: state h [batch, units] carried,
    x [time, batch, features] scanned, the steps stacked, a linear head."""
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "W"], ["xw"]),
            helper.make_node("MatMul", ["h_in", "R"], ["hr"]),
            helper.make_node("Add", ["xw", "hr"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["y_t"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", units]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", features]),
        ],
        [
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", units]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["batch", units]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Scan", ["h", "x"], ["h_last", "ys"], body=body, num_scan_inputs=1, name="scan"
            ),
            helper.make_node("MatMul", ["ys", "Wout"], ["y"]),
        ],
        "scan_rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", features]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", units]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", 1])],
        [
            _weights("W", [features, units]),
            _weights("R", [units, units]),
            _weights("Wout", [units, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_scan_recurrence_is_served_as_it_is(tmp_path: Path) -> None:
    graph = scan_rnn()
    repo = tmp_path / "repo"
    import_graph(save(tmp_path, graph), "scanned", 1, repo)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 2)).astype(np.float32)
    h = (0.5 * rng.standard_normal((2, 3))).astype(np.float32)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.transpose(1, 0, 2), "h": h})[0].transpose(1, 0, 2)
    with running(repository=repo) as srv, srv.client() as client:
        got = client.predict("scanned", x, initial_states={"h0": h}).y
        assert np.max(np.abs(got - expected)) <= 1e-5


def test_a_stack_of_different_recurrences_is_called_mixed() -> None:
    """A GRU over an LSTM was described by its first cell, as two GRUs."""
    from types import SimpleNamespace

    from rnnserve.models.importer import _cell

    def plan(*cells: str) -> SimpleNamespace:
        return SimpleNamespace(recurrences=[SimpleNamespace(cell=c) for c in cells])

    assert _cell(plan("lstm", "lstm")) == "lstm"
    assert _cell(plan("lstm", "gru")) == "mixed"
