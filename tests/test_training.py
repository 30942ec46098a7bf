"""Training and export (needs the training extra): tiny models, the real parity checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tensorflow", reason="training extra not installed")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402

from rnnserve.models.contract import CELLS, read_spec  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from training.architecture import Architecture, build_model  # noqa: E402
from training.onnx_export import ExportError, to_onnx  # noqa: E402
from training.pipeline import ExportRequest, export_task  # noqa: E402
from training.tasks import TASKS  # noqa: E402
from training.verify import make_probe, max_diff, run_onnx, verify_export  # noqa: E402

TINY_EPOCHS = {"echo": 1, "binary_add": 20, "digits": 1, "forecast": 1}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2])
def test_export_is_exact_for_every_cell(cell: str, layers: int) -> None:
    keras.utils.set_random_seed(layers)
    arch = Architecture(
        features=3,
        outputs=4,
        head="softmax",
        cell=cell,
        layers=layers,
        units=7,
        input_scale=(0.5, 2.0, 1.0),
        input_offset=(0.1, -1.0, 0.0),
    )
    model = build_model(arch)
    sample = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    report = verify_export(model, to_onnx(model), sample)  # raises past 1e-5
    assert set(report) == {"onnx_vs_keras", "streamed_vs_whole", "batch1_vs_batch64"}


@pytest.mark.parametrize("cell", ["gru", "simple_rnn", "lstm"])
def test_native_graph_agrees_with_tf2onnx(cell: str) -> None:
    """An independent converter (tf2onnx: Loop for GRU/SimpleRNN, native for LSTM) agrees."""
    import tensorflow as tf
    import tf2onnx

    arch = Architecture(features=2, outputs=1, head="sigmoid", cell=cell, layers=2, units=5)
    model = build_model(arch)
    signature = [tf.TensorSpec((None, None, 2), tf.float32, name="x")] + [
        tf.TensorSpec((None, 5), tf.float32, name=t.name) for t in model.inputs[1:]
    ]
    reference, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=17)
    probe = make_probe(model, np.random.default_rng(1).random((50, 2), np.float32), 8, 9)
    ours = run_onnx(ort.InferenceSession(to_onnx(model).SerializeToString()), probe)
    theirs_session = ort.InferenceSession(reference.SerializeToString())
    theirs = theirs_session.run(None, probe.feeds())
    assert (
        max(float(np.max(np.abs(ours["y"] - t))) for t in theirs if t.shape == ours["y"].shape)
        <= 1e-5
    )


def test_export_refuses_what_it_cannot_serve_exactly() -> None:
    x = keras.Input((None, 1), name="x")
    h = keras.Input((4,), name="h0")
    backwards = keras.layers.GRU(4, return_sequences=True, return_state=True, go_backwards=True)
    seq, _ = backwards(x, initial_state=[h])
    with pytest.raises(ExportError, match="backwards"):
        to_onnx(keras.Model([x, h], [keras.layers.Dense(1)(seq)]))
    bidi = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))(x)
    with pytest.raises(ExportError, match="Bidirectional"):
        to_onnx(keras.Model(x, keras.layers.Dense(1)(bidi)))
    arch = Architecture(
        features=1, outputs=1, head="linear", cell="lstm", units=3, activation="hard_sigmoid"
    )
    with pytest.raises(ExportError, match="hard_sigmoid"):
        to_onnx(build_model(arch))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tiny_training_exports_a_servable_model(task: str, tmp_path: Path) -> None:
    t = TASKS[task](seed=0)
    request = ExportRequest(
        cell="gru", layers=1, units=6, activation="tanh", epochs=TINY_EPOCHS[task], out=tmp_path
    )
    path = export_task(t, request, require_bar=False)
    spec = read_spec(path)
    assert (spec.name, spec.version, spec.cell) == (task, 1, "gru")
    for name in ("model.onnx", "model.json", "golden.npz", "training.png"):
        assert (path / name).stat().st_size > 0
    assert (
        max(
            spec.extra["verification"][k]
            for k in ("onnx_vs_keras", "streamed_vs_whole", "batch1_vs_batch64")
        )
        <= 1e-5
    )


def test_cli_reruns_give_identical_models(tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        cmd = [
            sys.executable,
            "-m",
            "training",
            "train",
            "--task",
            "echo",
            "--epochs",
            "1",
            "--cell",
            "lstm",
            "--out",
            str(tmp_path / run),
            "--no-bar",
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
        with np.load(tmp_path / run / "echo" / "1" / "golden.npz") as data:
            outputs.append(data["expected_y"])
    assert max_diff({"y": outputs[0]}, {"y": outputs[1]}) == 0.0


def test_a_saved_keras_model_is_exported_and_served(tmp_path: Path) -> None:
    """`python -m training export`: a many-to-one Keras model trained elsewhere (stacked
    LSTM and GRU, Dropout, Dense, Activation) becomes a streaming model whose last step
    answers what the saved model answers, over the wire; a layer it cannot stream is refused."""
    from tests.conftest import running

    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.LSTM(8, return_sequences=True),
            keras.layers.Dropout(0.2),
            keras.layers.GRU(6),
            keras.layers.Dense(4),
            keras.layers.Activation("softmax"),
        ]
    )
    model.save(tmp_path / "mine.keras")
    repo = tmp_path / "repo"
    cmd = [
        sys.executable,
        "-m",
        "training",
        "export",
        str(tmp_path / "mine.keras"),
        "--name",
        "mine",
        "--out",
        str(repo),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    spec = read_spec(repo / "mine" / "1")
    assert [s.input for s in spec.states] == ["h0", "c0", "h1"]
    assert spec.output_kind == "probabilities"
    x = np.random.default_rng(8).standard_normal((2, 7, 3)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    with running(repository=repo) as srv, srv.client() as client:
        assert np.max(np.abs(client.predict("mine", x, last_only=True).y - expected)) <= 1e-5
        with client.stream("mine") as stream:
            last = [stream.step(x[1, t]) for t in range(7)][-1]
        assert np.max(np.abs(last[0] - expected[1])) <= 1e-5

    bidirectional = keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.Bidirectional(keras.layers.LSTM(4)),
            keras.layers.Dense(1),
        ]
    )
    bidirectional.save(tmp_path / "bi.keras")
    refused = subprocess.run(
        [*cmd[:4], str(tmp_path / "bi.keras"), "--name", "bi", "--out", str(repo)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "of type Bidirectional cannot be served step by step" in refused.stderr
    assert not (repo / "bi").exists()


@pytest.mark.parametrize("layer", ["GRU", "SimpleRNN"])
def test_a_tf2onnx_loop_export_is_imported_and_served(layer: str, tmp_path: Path) -> None:
    """tf2onnx's real export of a Keras GRU / SimpleRNN (a generic Loop) through `rnnserve
    import`: served as it is, streamed and whole equal to Keras."""
    import tensorflow as tf
    import tf2onnx

    from rnnserve.models.importer import import_graph
    from tests.conftest import running

    keras.utils.set_random_seed(2)
    x_in = keras.Input((None, 2), name="x")
    seq = getattr(keras.layers, layer)(5, return_sequences=True)(x_in)
    model = keras.Model(x_in, keras.layers.Dense(1)(seq))
    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=[tf.TensorSpec((None, None, 2), tf.float32, name="x")], opset=17
    )
    assert "Loop" in {n.op_type for n in proto.graph.node}
    (tmp_path / "loop.onnx").write_bytes(proto.SerializeToString())
    written = import_graph(tmp_path / "loop.onnx", "keras_loop", 1, tmp_path / "repo")
    assert read_spec(written).cell == "loop"
    x = np.random.default_rng(6).standard_normal((3, 8, 2)).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    with running(repository=tmp_path / "repo") as srv, srv.client() as client:
        assert np.max(np.abs(client.predict("keras_loop", x).y - expected)) <= 1e-5
        with client.stream("keras_loop") as stream:
            streamed = np.concatenate([stream.step(x[2, t]) for t in range(8)])
        assert np.max(np.abs(streamed - expected[2])) <= 1e-5
