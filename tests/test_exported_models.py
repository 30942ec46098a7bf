"""The committed models: contract, native ops, golden vectors (no TensorFlow needed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME
from tests.conftest import EXPORTED, MODELS, golden, spec

EXPECTED = {"echo", "binary_add", "digits", "forecast"}


def test_every_seed_task_is_exported() -> None:
    assert EXPECTED <= set(MODELS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_vectors_through_onnx_runtime(name: str) -> None:
    s = spec(name)
    data = golden(name)
    session = ort.InferenceSession(
        str(EXPORTED / name / str(s.version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {INPUT_NAME: data[INPUT_NAME], **{st.input: data[st.input] for st in s.states}}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    expected_y = data[f"expected_{OUTPUT_NAME}"]
    assert outputs[OUTPUT_NAME].shape == expected_y.shape
    assert np.max(np.abs(outputs[OUTPUT_NAME] - expected_y) / (1 + np.abs(expected_y))) <= 1e-5
    for st in s.states:
        assert np.max(np.abs(outputs[st.output] - data[f"expected_{st.output}"])) <= 1e-5


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract_and_native_ops(name: str) -> None:
    s = spec(name)
    doc = s.to_json()
    for key in (
        "name",
        "version",
        "task",
        "cell",
        "layers",
        "units",
        "input",
        "output",
        "states",
        "training",
        "metrics",
        "tools",
    ):
        assert key in doc, key
    assert doc["metrics"]["bar"]["passed"] is True
    assert doc["metrics"]["seed_figure"]
    proto = onnx.load(str(EXPORTED / name / str(s.version) / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"LSTM", "GRU", "RNN"} and not ops & {"Loop", "Scan"}
    assert [i.name for i in proto.graph.input] == [INPUT_NAME, *(st.input for st in s.states)]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME, *(st.output for st in s.states)]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "time"]


def test_default_cells_match_the_brief() -> None:
    assert (spec("echo").cell, spec("echo").units) == ("simple_rnn", 4)
    assert (spec("binary_add").cell, spec("binary_add").layers, spec("binary_add").units) == (
        "lstm",
        2,
        20,
    )
    assert (spec("digits").cell, spec("digits").units) == ("simple_rnn", 16)
    assert spec("forecast").cell == "gru"
