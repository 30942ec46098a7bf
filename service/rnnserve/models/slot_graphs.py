"""Small ONNX graphs that move session state between the slot tables and a run, executed by
the same ONNX Runtime provider as the model, so state that lives on a GPU stays there.

gather: tables t0..tn [capacity, size_i] and slots [rows, 1] -> rows r0..rn [rows, size_i].
scatter: tables, slots [rows, 1] and updates u0..un [rows, size_i] -> tables o0..on, bound by
the caller to the same memory as t0..tn: ScatterND skips copying its input to its output when
they are one buffer (ONNX Runtime's CPU and CUDA kernels both check), so a step writes only
its own rows, whatever the table's capacity.
"""

from __future__ import annotations

# onnx is imported where a graph is built: a server that keeps state on the host never loads
# it (11 MiB and 0.1 s per worker process).
import functools

OPSET = 13
IR_VERSION = 8
"""Old enough for every ONNX Runtime the package supports (>= 1.20)."""
SLOTS = "slots"


def table(i: int) -> str:
    return f"t{i}"


def rows(i: int) -> str:
    return f"r{i}"


def update(i: int) -> str:
    return f"u{i}"


def updated(i: int) -> str:
    return f"o{i}"


def _model(nodes: list, inputs: list, outputs: list, name: str) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve"
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def _float(name: str, *dims: str | int) -> object:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


@functools.cache
def gather_model(sizes: tuple[int, ...]) -> bytes:
    """Rows of every state table at the given slots, in one run."""
    from onnx import TensorProto, helper

    inputs = [_float(table(i), "capacity", n) for i, n in enumerate(sizes)]
    inputs.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["rows", 1]))
    nodes = [helper.make_node("GatherND", [table(i), SLOTS], [rows(i)]) for i in range(len(sizes))]
    outputs = [_float(rows(i), "rows", n) for i, n in enumerate(sizes)]
    return _model(nodes, inputs, outputs, "gather_slots")


@functools.cache
def scatter_model(sizes: tuple[int, ...]) -> bytes:
    """Every state table with the given slots' rows replaced, in one run."""
    from onnx import TensorProto, helper

    inputs = [_float(table(i), "capacity", n) for i, n in enumerate(sizes)]
    inputs.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["rows", 1]))
    inputs += [_float(update(i), "rows", n) for i, n in enumerate(sizes)]
    nodes = [
        helper.make_node("ScatterND", [table(i), SLOTS, update(i)], [updated(i)])
        for i in range(len(sizes))
    ]
    outputs = [_float(updated(i), "capacity", n) for i, n in enumerate(sizes)]
    return _model(nodes, inputs, outputs, "scatter_slots")


def probe_model() -> bytes:
    """A graph any provider can load: to ask whether one really does."""
    return gather_model((1,))
