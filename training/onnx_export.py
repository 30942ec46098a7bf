"""Keras model → ONNX graph whose recurrent layers are the native LSTM, GRU and RNN operators.

tf2onnx 1.17 turns Keras 3 GRU and SimpleRNN layers into a generic `Loop` (measured: ~50× slower
per step than the native op), so the graph is built here from the layer weights instead. Anything
this cannot reproduce exactly is refused with ExportError rather than approximated.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME

OPSET = 17
ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
HEAD_ACTIVATIONS = {
    "softmax": "Softmax",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "relu": "Relu",
    "linear": None,
}
# Keras LSTM gate blocks are (i, f, c, o); ONNX LSTM wants (i, o, f, c).
LSTM_GATE_ORDER = (0, 3, 1, 2)


class ExportError(ValueError):
    """The model cannot be served exactly (e.g. bidirectional layers for streaming)."""


def _activation_name(layer: keras.layers.Layer, attr: str, table: dict) -> str | None:
    fn = getattr(layer, attr)
    name = getattr(fn, "__name__", str(fn))
    if name not in table:
        raise ExportError(
            f"layer {layer.name!r}: {attr} {name!r} has no exact ONNX equivalent; "
            f"use one of {', '.join(k for k in table)}"
        )
    return table[name]


def _gate_blocks(matrix: np.ndarray, units: int, order: tuple[int, ...]) -> np.ndarray:
    """Reorder the gate blocks along the last axis and transpose to ONNX's [gates*units, in]."""
    blocks = [matrix[..., g * units : (g + 1) * units] for g in order]
    return np.concatenate(blocks, axis=-1).T


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        self._count += 1
        outs = [f"{op.lower()}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self._count}", **attrs))
        return outs

    def rename_output(self, tensor: str, name: str) -> None:
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"out_{name}"))


def _recurrent(
    b: _GraphBuilder, layer: keras.layers.Layer, seq: str, states: list[str], index: int
) -> tuple[str, list[str]]:
    """Emit one recurrent layer over seq [T, B, in]; return its [T, B, units] output and states."""
    if getattr(layer, "go_backwards", False):
        raise ExportError(f"layer {layer.name!r} runs backwards; streaming needs forward layers")
    units = layer.units
    kind = type(layer).__name__
    weights = [np.asarray(w, "float32") for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if len(weights) > 2 else None
    act = _activation_name(layer, "activation", ACTIVATIONS)
    attrs: dict = {"hidden_size": units}
    if kind == "LSTM":
        op, order = "LSTM", LSTM_GATE_ORDER
        w_bias = bias if bias is not None else np.zeros(4 * units, "float32")
        b_all = np.concatenate([_gate_blocks(w_bias, units, order), np.zeros(4 * units, "float32")])
        attrs["activations"] = [
            _activation_name(layer, "recurrent_activation", ACTIVATIONS),
            act,
            act,
        ]
    elif kind == "GRU":
        op, order = "GRU", (0, 1, 2)
        if bias is None:
            b_all = np.zeros(6 * units, "float32")
        elif layer.reset_after:
            b_all = bias.reshape(-1)
        else:
            b_all = np.concatenate([bias, np.zeros(3 * units, "float32")])
        attrs["linear_before_reset"] = int(layer.reset_after)
        attrs["activations"] = [_activation_name(layer, "recurrent_activation", ACTIVATIONS), act]
    elif kind == "SimpleRNN":
        op, order = "RNN", (0,)
        w_bias = bias if bias is not None else np.zeros(units, "float32")
        b_all = np.concatenate([w_bias, np.zeros(units, "float32")])
        attrs["activations"] = [act]
    else:
        raise ExportError(
            f"layer {layer.name!r} of type {kind} is not an exportable recurrent layer"
        )
    w = b.const(f"W{index}", _gate_blocks(kernel, units, order)[None])
    r = b.const(f"R{index}", _gate_blocks(recurrent, units, order)[None])
    bb = b.const(f"B{index}", b_all.astype("float32")[None])
    axis0 = b.const(f"axis0_{index}", np.array([0], "int64"))
    init = [b.node("Unsqueeze", [s, axis0])[0] for s in states]
    outs = b.node(op, [seq, w, r, bb, "", *init], n_out=1 + len(states), **attrs)
    axis1 = b.const(f"axis1_{index}", np.array([1], "int64"))
    y = b.node("Squeeze", [outs[0], axis1])[0]
    finals = [b.node("Squeeze", [o, axis0])[0] for o in outs[1:]]
    return y, finals


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    """Convert a model built by training.architecture.build_model, layer by layer."""
    b = _GraphBuilder()
    x_in = model.inputs[0]
    features = x_in.shape[-1]
    graph_inputs = [
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", "time", features])
    ]
    state_in = list(model.inputs[1:])
    for t in state_in:
        graph_inputs.append(
            helper.make_tensor_value_info(t.name, TensorProto.FLOAT, ["batch", t.shape[-1]])
        )
    cur = INPUT_NAME  # [B, T, F] until the first recurrent layer, then [T, B, U]
    time_major = False
    state_cursor, final_states, rnn_index = 0, [], 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind == "Rescaling":
            scale = np.asarray(layer.scale, "float32")
            offset = np.asarray(layer.offset, "float32")
            cur = b.node("Mul", [cur, b.const(f"{layer.name}_scale", scale)])[0]
            cur = b.node("Add", [cur, b.const(f"{layer.name}_offset", offset)])[0]
        elif kind in ("LSTM", "GRU", "SimpleRNN"):
            if not time_major:
                cur = b.node("Transpose", [cur], perm=[1, 0, 2])[0]
                time_major = True
            n_states = 2 if kind == "LSTM" else 1
            names = [t.name for t in state_in[state_cursor : state_cursor + n_states]]
            if len(names) != n_states:
                raise ExportError(f"layer {layer.name!r} has no state inputs of its own")
            state_cursor += n_states
            cur, finals = _recurrent(b, layer, cur, names, rnn_index)
            final_states += finals
            rnn_index += 1
        elif kind == "Dense":
            if not time_major:
                raise ExportError(f"Dense layer {layer.name!r} before any recurrent layer")
            kernel, *rest = [np.asarray(w, "float32") for w in layer.get_weights()]
            cur = b.node("MatMul", [cur, b.const(f"{layer.name}_kernel", kernel)])[0]
            if rest:
                cur = b.node("Add", [cur, b.const(f"{layer.name}_bias", rest[0])])[0]
            op = _activation_name(layer, "activation", HEAD_ACTIVATIONS)
            if op:
                cur = b.node(op, [cur], **({"axis": -1} if op == "Softmax" else {}))[0]
            cur = b.node("Transpose", [cur], perm=[1, 0, 2])[0]
            time_major = False
        elif kind == "Activation":
            op = _activation_name(layer, "activation", HEAD_ACTIVATIONS)
            if op:
                cur = b.node(op, [cur], **({"axis": -1} if op == "Softmax" else {}))[0]
        elif kind == "Add" and not time_major:
            cur = b.node("Add", [INPUT_NAME, cur])[0]
        else:
            raise ExportError(
                f"layer {layer.name!r} of type {kind} cannot be served exactly "
                "step by step (supported: Rescaling, LSTM, GRU, SimpleRNN, Dense, "
                "Activation, residual Add)"
            )
    if rnn_index == 0 or time_major:
        raise ExportError("the model needs recurrent layers followed by a Dense head")
    if state_cursor != len(state_in):
        raise ExportError("every state input must feed a recurrent layer")
    b.rename_output(cur, OUTPUT_NAME)
    outputs = [
        helper.make_tensor_value_info(
            OUTPUT_NAME, TensorProto.FLOAT, ["batch", "time", model.outputs[0].shape[-1]]
        )
    ]
    for t, final in zip(state_in, final_states):
        b.rename_output(final, f"{t.name}_out")
        outputs.append(
            helper.make_tensor_value_info(
                f"{t.name}_out", TensorProto.FLOAT, ["batch", t.shape[-1]]
            )
        )
    graph = helper.make_graph(b.nodes, "rnnserve", graph_inputs, outputs, b.initializers)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve.training"
    )
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto
