"""`rnnserve import`: a recurrent ONNX graph from another exporter (PyTorch's nn.LSTM/GRU/RNN,
time-major or batch-first, states stacked [layers, batch, hidden] or none at all), wrapped into
rnnserve's contract and proven equal to the original before anything is written.

The wrapping does not try to understand how the original feeds its recurrent operators their
initial states: every native LSTM/GRU/RNN node gets state inputs and outputs of its own
([batch, hidden] each; h, plus c for an LSTM), wired straight to its initial_h/initial_c and
Y_h/Y_c. The pairing of a state input with its output is then the operator's own, never a
guess, and whatever the original computed its initial states from falls away. x and y get
Transposes where the original is time-major, which is found by running it, not by reading
names.

The proof: the original runs with random inputs and random states of its own (its per-node
initial states are read out of the run), the wrapped graph runs whole from those same states,
and then one timestep at a time with its states carried; outputs and final states must agree
within 1e-5. Graphs it cannot serve exactly (bidirectional or reversed recurrences, no
recurrent operator, no output per timestep, anything that fails the proof) are refused with a
one-line reason, and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rnnserve.models.checks import check_model, off_by
from rnnserve.models.contract import (
    INPUT_NAME,
    LOOP,
    MAX_VERSION_DIGITS,
    MIXED,
    OUTPUT_KINDS,
    OUTPUT_NAME,
    ModelSpec,
    StateSpec,
    check_model_name,
    read_spec,
    state_names,
    version_dir,
    write_version,
)
from rnnserve.models.runner import CPU, OrtRunner, session_options

NATIVE = {"LSTM": "lstm", "GRU": "gru", "RNN": "simple_rnn"}
INITIAL_H, INITIAL_C = 5, 6
"""Input positions of initial_h and initial_c on ONNX's LSTM, GRU and RNN operators."""
TOLERANCE = 1e-5
PREFIX = "src/"
"""Every tensor of the original is renamed under this prefix, so the contract's names (x, y,
h0, …) can never collide with the original's (PyTorch names its inputs h0 and c0)."""
BATCH, TIME = 3, 5
"""Distinct sizes, so a run's shapes tell the batch axis from the time axis."""


class ImportRefused(ValueError):
    """What makes the graph unservable, in one line."""


@dataclass(frozen=True)
class State:
    """One contract state of a recurrent node: where it goes in and comes out."""

    input: str
    output: str
    size: int
    fed_at: int
    """The node's input position it replaces (initial_h/initial_c; a Loop's carried value)."""
    comes_out: int
    """The node's output position of its final value (Y_h/Y_c; a Loop's final carried value)."""


@dataclass(frozen=True)
class Recurrence:
    """One recurrent node of the original and the contract states it gets."""

    node: onnx.NodeProto
    cell: str
    states: list[State]
    directions_axis: int | None
    """The [1] axis native ops put in initial_h and Y_h (0 for layout 0, 1 for layout 1);
    None for a Loop, whose carried states are [batch, size] already."""
    sequence_inputs: set[str]
    """What the sequence flows into: X; a Loop's trip count and what its body reads from
    outside; a Scan's scanned inputs and the same."""
    sequence_outputs: list[str]
    """Outputs with a value per timestep: Y, or a Loop's or Scan's scan outputs."""


@dataclass(frozen=True)
class Plan:
    x: str
    y: str
    time_major: bool
    """x is [time, batch, features]."""
    y_time_major: bool
    y_squeeze: bool
    """y comes out as ONNX's raw [time, directions, batch, hidden]: squeeze the directions."""
    features: int
    outputs: int
    recurrences: list[Recurrence]


def import_graph(
    graph: Path,
    name: str,
    version: int,
    repository: Path,
    *,
    time_major: bool | None = None,
    input_name: str = "",
    output_name: str = "",
    output_kind: str = "regression",
    description: str = "",
) -> Path:
    """Write repository/name/version/ (model.onnx, model.json, golden.npz) for the graph; the
    directory written. ImportRefused (and nothing written) when it cannot be served exactly."""
    if output_kind not in OUTPUT_KINDS:
        raise ImportRefused(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}")
    try:  # before any work, and before a path is made of it
        check_model_name(name)
    except ValueError as exc:
        raise ImportRefused(f"--name: {exc}") from None
    if not 1 <= version < 10**MAX_VERSION_DIGITS:
        raise ImportRefused(f"--version must be from 1 to {10**MAX_VERSION_DIGITS - 1}")
    target = version_dir(repository, name, version)
    if target.exists():
        raise ImportRefused(f"{target} already exists; pick another --version")
    original = _load(graph)
    model = _renamed(original)
    plan = _plan(model, time_major, input_name, output_name)
    wrapped = _wrap(model, plan)
    golden, checks = _prove(original, wrapped, plan)
    spec = ModelSpec(
        name=name,
        version=version,
        task="imported",
        description=description
        or f"imported from {graph.name} ({', '.join(r.node.op_type for r in plan.recurrences)})",
        cell=_cell(plan),
        layers=len(plan.recurrences),
        units=max(st.size for r in plan.recurrences for st in r.states),
        features=plan.features,
        outputs=plan.outputs,
        output_kind=output_kind,
        states=tuple(StateSpec(st.input, st.output, st.size) for st in _states(plan)),
        extra={
            "imported": {
                "source": graph.name,
                "sha256": _fingerprint(graph),
                "external_data": _external_files(graph),
                "producer": f"{original.producer_name} {original.producer_version}".strip(),
                "recurrent_ops": [
                    f"{r.node.op_type} ({r.node.name or 'unnamed'})" for r in plan.recurrences
                ],
                "x_layout": "time-major" if plan.time_major else "batch-first",
                "verification": checks,
                "notes": _notes(plan),
            }
        },
    )
    spec.validate()
    return write_version(target, wrapped.SerializeToString(), spec, golden, _check_staged)


def _cell(plan: Plan) -> str:
    """The stack's one cell kind, or MIXED (a GRU over an LSTM was described as 2 GRUs)."""
    cells = {r.cell for r in plan.recurrences}
    return cells.pop() if len(cells) == 1 else MIXED


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: initializers, and those in node attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _external_files(graph: Path) -> list[str]:
    """The files beside the graph that hold its external tensors, in name order (read from
    the file itself: loading the data marks the tensors as held inline)."""
    model = onnx.load(str(graph), load_external_data=False)
    return sorted(
        {
            entry.value
            for tensor in _tensors(model.graph)
            if tensor.data_location == TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )


def _fingerprint(graph: Path) -> str:
    """sha256 over the graph file and then each external data file in name order: the weights
    of a graph saved with external data live in those, and a digest of the .onnx alone let
    them change unnoticed."""
    digest = hashlib.sha256(graph.read_bytes())
    for name in _external_files(graph):
        digest.update((graph.parent / name).read_bytes())
    return digest.hexdigest()


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # OSError, protobuf's DecodeError, the checker's ValidationError
        raise ImportRefused(f"{path} is not a valid ONNX model: {_line(exc)}") from None
    return model


def _renamed(original: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(original)
    _prefix_graph(model.graph)
    return model


def _prefix_graph(graph: onnx.GraphProto) -> None:
    def name(n: str) -> str:
        return PREFIX + n if n else n

    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = name(value.name)
    for tensor in graph.initializer:
        tensor.name = name(tensor.name)
    for node in graph.node:
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _prefix_graph(sub)


def _plan(
    model: onnx.ModelProto, time_major: bool | None, input_name: str, output_name: str
) -> Plan:
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type in (*NATIVE, *CONTROL_FLOW)]
    if not nodes:
        raise ImportRefused(
            "it has no recurrent operator (LSTM, GRU, RNN, or a Loop or Scan "
            "over time): nothing to carry between steps" + _unrolled(model)
        )
    recurrences = [_recurrence(node, index) for index, node in enumerate(nodes)]
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    # x flows into the first recurrent node's X (a stacked h0 reaches only later layers' X);
    # y comes from the last one's per-step output (stacked final states come from Y_h).
    first, last = recurrences[0], recurrences[-1]
    x = _pick(inputs, input_name, "input", lambda i: _reaches(graph, i.name, first))
    y = _pick(
        list(graph.output),
        output_name,
        "output",
        lambda o: any(_derives(graph, o.name, s) for s in last.sequence_outputs),
    )
    features = _sequence_shape(x)
    return _probe(model, x.name, y.name, features, recurrences, time_major)


def _recurrence(node: onnx.NodeProto, index: int) -> Recurrence:
    if node.op_type in CONTROL_FLOW:
        return _control_flow(node, index)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise ImportRefused(
            f"its {node.op_type} {node.name!r} runs {direction}: its output at a "
            "step depends on later steps, so it cannot be streamed"
        )
    if "hidden_size" not in attrs:
        raise ImportRefused(f"its {node.op_type} {node.name!r} has no hidden_size")
    cell = NATIVE[node.op_type]
    positions = [INITIAL_H, INITIAL_C] if cell == "lstm" else [INITIAL_H]
    hidden = int(attrs["hidden_size"])
    states = [
        State(i, o, hidden, p, 1 + k)
        for k, ((i, o), p) in enumerate(zip(state_names(cell, index), positions, strict=True))
    ]
    return Recurrence(
        node,
        cell,
        states,
        1 if attrs.get("layout", 0) == 1 else 0,
        {node.input[0]},
        [node.output[0]],
    )


CONTROL_FLOW = {"Loop": (2, 2, 1), "Scan": (0, 0, 0)}
"""Where the carried values start: in the node's inputs, its body's inputs and its body's
outputs (a Loop's come after the trip count and condition)."""


def _control_flow(node: onnx.NodeProto, index: int) -> Recurrence:
    """A Loop or Scan over time, as tf2onnx writes Keras GRU and SimpleRNN: its carried float
    values with a batch axis that the body changes are the states ([batch, size]); its scan
    outputs the per-step values."""
    attrs = {a.name: a for a in node.attribute}
    body = attrs["body"].g
    node_at, body_in_at, body_out_at = CONTROL_FLOW[node.op_type]
    scanned = helper.get_attribute_value(attrs["num_scan_inputs"]) if node.op_type == "Scan" else 0
    carried = len(node.input) - node_at - scanned
    states: list[State] = []
    for k, value in enumerate(body.input[body_in_at : body_in_at + carried]):
        tensor = value.type.tensor_type
        if (
            tensor.elem_type != TensorProto.FLOAT
            or len(tensor.shape.dim) != 2
            or tensor.shape.dim[0].HasField("dim_value")  # no batch axis: a constant
            or _passed_through(body, value.name, body.output[body_out_at + k].name)
        ):
            continue
        size = tensor.shape.dim[1]
        if not size.HasField("dim_value"):
            raise ImportRefused(
                f"its {node.op_type} {node.name!r} carries {value.name!r} "
                "without a fixed size; cannot tell its state size"
            )
        n = len(states)
        states.append(
            State(
                f"h{index}" if n == 0 else f"h{index}_{n}",
                f"h{index}_out" if n == 0 else f"h{index}_{n}_out",
                int(size.dim_value),
                node_at + k,
                k,
            )
        )
    if not states:
        raise ImportRefused(
            f"its {node.op_type} {node.name!r} carries no [batch, size] float "
            "value that changes: no recurrent state to serve"
        )
    sequence = {
        *(node.input[:1] if node.op_type == "Loop" else node.input[carried:]),
        *_outer_names(node),
    }
    return Recurrence(node, LOOP, states, None, sequence, list(node.output[carried:]))


def _passed_through(body: onnx.GraphProto, carried_in: str, carried_out: str) -> bool:
    """Whether the body hands a carried value on unchanged (weights tf2onnx carries along)."""
    producer = {o: n for n in body.node for o in n.output}
    name = carried_out
    while name != carried_in:
        node = producer.get(name)
        if node is None or node.op_type != "Identity":
            return False
        name = node.input[0]
    return True


def _pick(candidates: list, chosen: str, what: str, fits) -> onnx.ValueInfoProto:
    """The graph's sequence input (or per-step output): the one named, or the only fit."""
    if chosen:
        named = [c for c in candidates if c.name == PREFIX + chosen]
        if not named:
            raise ImportRefused(
                f"the graph has no {what} {chosen!r}; it has "
                f"{', '.join(c.name.removeprefix(PREFIX) for c in candidates)}"
            )
        return named[0]
    fitting = [c for c in candidates if fits(c)]
    if len(fitting) != 1:
        names = ", ".join(c.name.removeprefix(PREFIX) for c in fitting) or "none"
        raise ImportRefused(
            f"cannot tell which {what} is the sequence ({names} could be); "
            f"name it with --{what} NAME"
        )
    return fitting[0]


def _reaches(graph: onnx.GraphProto, start: str, recurrence: Recurrence) -> bool:
    """Whether tensor `start` flows into the node's sequence inputs."""
    targets = recurrence.sequence_inputs
    seen, frontier = {start}, [start]
    while frontier:
        tensor = frontier.pop()
        if tensor in targets:
            return True
        for consumer in graph.node:
            if tensor in consumer.input or tensor in _outer_names(consumer):
                fresh = [o for o in consumer.output if o and o not in seen]
                seen.update(fresh)
                frontier += fresh
    return False


def _derives(graph: onnx.GraphProto, end: str, source: str) -> bool:
    """Whether tensor `end` is computed from tensor `source`."""
    producer = {o: n for n in graph.node for o in n.output}
    seen, frontier = {end}, [end]
    while frontier:
        tensor = frontier.pop()
        if tensor == source:
            return True
        node = producer.get(tensor)
        if node is not None:
            fresh = [i for i in node.input if i and i not in seen]
            seen.update(fresh)
            frontier += fresh
    return False


def _sequence_shape(value: onnx.ValueInfoProto) -> int:
    """Features per step of the sequence input; its batch and time must be free."""
    name = value.name.removeprefix(PREFIX)
    dims = value.type.tensor_type.shape.dim
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportRefused(f"input {name!r} is not float32")
    if len(dims) != 3 or not dims[2].HasField("dim_value"):
        raise ImportRefused(
            f"input {name!r} must be rank 3 with a fixed feature size ([time, "
            "batch, features] or [batch, time, features])"
        )
    if dims[0].HasField("dim_value") or dims[1].HasField("dim_value"):
        fixed = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise ImportRefused(
            f"input {name!r} has fixed batch or time sizes {fixed}: export "
            "with dynamic axes for both (torch.onnx.export's dynamic_axes)"
        )
    return int(dims[2].dim_value)


def _probe(
    model: onnx.ModelProto,
    x: str,
    y: str,
    features: int,
    recurrences: list[Recurrence],
    time_major: bool | None,
) -> Plan:
    """Run the wrapped graph under each layout the flags allow: the one that runs (batch and
    time differ, so the other fails on a shape) is the graph's, and y's shape tells its own."""
    layouts = [time_major] if time_major is not None else [False, True]
    errors = []
    for layout in layouts:
        plan = Plan(x, y, layout, False, False, features, 0, recurrences)
        shape = f"[time, batch, {features}]" if layout else f"[batch, time, {features}]"
        try:
            session = _session(_wrap(model, plan, raw_y=True))
        except Exception as exc:  # noqa: BLE001 - ORT raises several kinds for a bad graph
            errors.append(f"as {shape}: {_line(exc)}")
            continue
        rng = np.random.default_rng(0)
        feeds = {INPUT_NAME: rng.standard_normal((BATCH, TIME, features)).astype(np.float32)}
        for r in recurrences:
            for state in r.states:
                feeds[state.input] = np.zeros((BATCH, state.size), np.float32)
        try:
            raw = session.run([OUTPUT_NAME], feeds)[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"as {shape}: {_line(exc)}")
            continue
        return _y_layout(plan, raw.shape)
    fixed = _fixed_inside(model, y)
    if fixed:
        raise ImportRefused(f"{fixed} ({'; '.join(errors)})")
    raise ImportRefused(
        f"it does not run as a sequence model here ({'; '.join(errors)}); "
        "if it is time-major or batch-first, say so with --time-major or --batch-first"
    )


TORCH_FIX = (
    "build it with batch_first=True and export with torch.export.Dim for batch and time, "
    "or export with dynamo=False and dynamic_axes (docs/models.md, Serve your own model)"
)
"""What to change when torch's dynamo exporter (torch.onnx.export's default since 2.9) fixed
the traced length: measured on torch 2.13, it unrolls nn.RNN over the traced steps, and a
time-major nn.LSTM or nn.GRU gets a Reshape to [traced length, -1, hidden] after its last
layer; a batch-first LSTM or GRU comes out free, and the legacy exporter frees all three."""


def _from_torch(model: onnx.ModelProto) -> bool:
    return model.producer_name == "pytorch"


def _unrolled(model: onnx.ModelProto) -> str:
    """Why a graph without a recurrent operator has none, when its input says so: an exporter
    that traced the model unrolled the recurrence over the traced number of steps."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        fixed = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        if len(dims) == 3 and any(d.HasField("dim_value") for d in dims[:2]):
            name = value.name.removeprefix(PREFIX)
            return (
                f"; input {name!r} is {fixed}, so the exporter unrolled the recurrence "
                "over the traced steps"
                + (
                    " (torch.onnx.export's dynamo exporter does this to nn.RNN: export it "
                    "with dynamo=False and dynamic_axes, docs/models.md)"
                    if _from_torch(model)
                    else ""
                )
            )
    return ""


def _fixed_inside(model: onnx.ModelProto, y: str) -> str:
    """The Reshapes that fix the traced length (a number where output y's declared batch or
    time axis has it, while the sequence input's are free), and what to change; '' if none."""
    graph = model.graph
    free = any(
        len(i.type.tensor_type.shape.dim) == 3
        and not any(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim[:2])
        for i in graph.input
    )
    traced = {
        d.dim_value
        for o in graph.output
        if o.name == y
        for d in o.type.tensor_type.shape.dim[:2]
        if d.HasField("dim_value")
    }
    if not free or not traced:
        return ""
    constants = {t.name: t for t in graph.initializer} | {
        n.output[0]: a.t
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    fixed = [
        f"{n.name or n.op_type} to {shape}"
        for n in graph.node
        if n.op_type == "Reshape" and n.input[1] in constants
        for shape in [numpy_helper.to_array(constants[n.input[1]]).tolist()]
        if traced & set(shape)
    ]
    if not fixed:
        return ""
    return (
        f"it runs only at the length it was traced with: its exporter fixed "
        f"{' or '.join(map(str, sorted(traced)))} inside the graph (Reshape {', '.join(fixed)})"
        + (f"; {TORCH_FIX}" if _from_torch(model) else "")
    )


def _y_layout(plan: Plan, shape: tuple[int, ...]) -> Plan:
    squeeze = len(shape) == 4 and shape[1] == 1
    dims = (shape[0], *shape[2:]) if squeeze else shape
    if len(dims) != 3 or {dims[0], dims[1]} != {BATCH, TIME}:
        raise ImportRefused(
            f"its output {plan.y.removeprefix(PREFIX)!r} has shape {list(shape)} "
            f"for {BATCH} sequences of {TIME} steps: rnnserve needs one output "
            "per timestep ([batch, time, outputs]); export the per-step output"
        )
    return Plan(
        plan.x,
        plan.y,
        plan.time_major,
        dims[0] == TIME,
        squeeze,
        plan.features,
        int(dims[2]),
        plan.recurrences,
    )


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _wrap(source: onnx.ModelProto, plan: Plan, raw_y: bool = False) -> onnx.ModelProto:
    """The contract around the (renamed) original: x, per-node states, y and final states."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    opset = _opset(model)
    before: list[onnx.NodeProto] = []  # feeding the original, in order
    after: list[onnx.NodeProto] = []  # reading its outputs
    initializers: list[onnx.TensorProto] = []

    def axes(op: str, data: str, axis: int, out: str) -> onnx.NodeProto:
        if opset < 13:
            return helper.make_node(op, [data], [out], axes=[axis])
        name = f"axes_{axis}"
        if not any(t.name == name for t in initializers):
            initializers.append(helper.make_tensor(name, TensorProto.INT64, [1], [axis]))
        return helper.make_node(op, [data, name], [out])

    batch, time = "batch", "time"
    if plan.time_major:
        before.append(helper.make_node("Transpose", [INPUT_NAME], [plan.x], perm=[1, 0, 2]))
    else:
        before.append(helper.make_node("Identity", [INPUT_NAME], [plan.x]))
    inputs = [
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, time, plan.features])
    ]
    outputs = []
    if raw_y:
        after.append(helper.make_node("Identity", [plan.y], [OUTPUT_NAME]))
        outputs.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None))
    else:
        y = plan.y
        if plan.y_squeeze:
            after.append(axes("Squeeze", y, 1, "y_squeezed"))
            y = "y_squeezed"
        after.append(
            helper.make_node("Transpose", [y], [OUTPUT_NAME], perm=[1, 0, 2])
            if plan.y_time_major
            else helper.make_node("Identity", [y], [OUTPUT_NAME])
        )
        outputs.append(
            helper.make_tensor_value_info(
                OUTPUT_NAME, TensorProto.FLOAT, [batch, time, plan.outputs]
            )
        )
    for r in plan.recurrences:
        node = _same_node(graph, r.node)
        while len(node.input) <= max(st.fed_at for st in r.states):
            node.input.append("")
        for state in r.states:
            fed = state.input
            if r.directions_axis is not None:
                fed = f"{state.input}_fed"
                before.append(axes("Unsqueeze", state.input, r.directions_axis, fed))
            node.input[state.fed_at] = fed
            final = _final_of(node, state, f"{state.output}_raw")
            after.append(
                axes("Squeeze", final, r.directions_axis, state.output)
                if r.directions_axis is not None
                else helper.make_node("Identity", [final], [state.output])
            )
            inputs.append(
                helper.make_tensor_value_info(state.input, TensorProto.FLOAT, [batch, state.size])
            )
            outputs.append(
                helper.make_tensor_value_info(state.output, TensorProto.FLOAT, [batch, state.size])
            )
    kept = [*before, *graph.node, *after]
    del graph.node[:]
    graph.node.extend(_live(kept, [o.name for o in outputs]))
    used = {i for n in graph.node for i in (*n.input, *_outer_names(n))}
    graph.initializer.extend(initializers)
    live_initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live_initializers)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.value_info[:]
    return model


def _same_node(graph: onnx.GraphProto, node: onnx.NodeProto, prefix: str = "") -> onnx.NodeProto:
    """The node of `graph` that is `node` of the plan's graph (same op, same outputs once
    `prefix` is added: the plan's graph has the original's names under PREFIX)."""
    return next(
        n
        for n in graph.node
        if n.op_type == node.op_type
        and [prefix + o if o else o for o in n.output] == list(node.output)
    )


def _final_of(node: onnx.NodeProto, state: State, name: str) -> str:
    """The tensor the node writes `state`'s final value to, named `name` where the graph left
    that output unnamed (PyTorch often does: nobody read it)."""
    while len(node.output) <= state.comes_out:
        node.output.append("")
    if not node.output[state.comes_out]:
        node.output[state.comes_out] = name
    return node.output[state.comes_out]


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their order (the original's are topological)."""
    producer = {o: n for n in nodes for o in n.output if o}
    needed: set[int] = set()
    frontier = list(outputs)
    seen = set(frontier)
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        for name in (*node.input, *_outer_names(node)):
            if name and name not in seen:
                seen.add(name)
                frontier.append(name)
    return [n for n in nodes if id(n) in needed]


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph."""
    names = []
    for attribute in node.attribute:
        for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
            local = (
                {i.name for i in sub.input}
                | {t.name for t in sub.initializer}
                | {o for n in sub.node for o in n.output}
            )
            names += [
                i for n in sub.node for i in (*n.input, *_outer_names(n)) if i and i not in local
            ]
    return names


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """On the CPU, with the options the server runs every model with, but quiet: every failure
    here is caught and becomes the refusal's one line, so ONNX Runtime's own error lines (the
    probe's rejected layout; a run at a length the graph fixed) and its warnings (each run of a
    dynamo export whose y is declared with the traced length) would only be noise."""
    options = session_options()
    options.log_severity_level = 4  # fatal only
    return ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])


def _prove(
    original: onnx.ModelProto, wrapped: onnx.ModelProto, plan: Plan
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The golden set and the worst differences, or ImportRefused."""
    rng = np.random.default_rng(1)
    batch, steps = 4, 9
    x = rng.standard_normal((batch, steps, plan.features)).astype(np.float32)
    probe = _with_outputs(original, plan)
    feeds = {}
    for value in probe.graph.input:
        if value.name in {t.name for t in probe.graph.initializer}:
            continue
        if value.name == plan.x.removeprefix(PREFIX):
            feeds[value.name] = x.transpose(1, 0, 2) if plan.time_major else x
        else:
            feeds[value.name] = _random_like(value, batch, rng)
    try:
        got = dict(
            zip([o.name for o in probe.graph.output], _session(probe).run(None, feeds), strict=True)
        )
    except Exception as exc:  # noqa: BLE001
        fixed = _fixed_inside(original, plan.y.removeprefix(PREFIX))
        raise ImportRefused(
            f"{fixed} ({_line(exc)})"
            if fixed
            else f"the original graph does not run on random inputs: {_line(exc)}"
        ) from None
    y = got[plan.y.removeprefix(PREFIX)]
    y = y[:, 0] if plan.y_squeeze else y
    expected_y = y.transpose(1, 0, 2) if plan.y_time_major else y
    initial, expected_finals = {}, {}
    for r in plan.recurrences:
        for st in r.states:
            fed = got.get(f"probe_{st.input}")
            initial[st.input] = (
                np.zeros((batch, st.size), np.float32) if fed is None else _unstacked(fed, r)
            )
            expected_finals[st.output] = _unstacked(got[f"probe_{st.output}"], r)
    session = _session(wrapped)
    names = [o.name for o in wrapped.graph.output]
    state = dict(initial)
    streamed_y = []
    try:
        whole = dict(zip(names, session.run(None, {INPUT_NAME: x, **initial}), strict=True))
        for t in range(steps):
            step = dict(
                zip(names, session.run(None, {INPUT_NAME: x[:, t : t + 1], **state}), strict=True)
            )
            streamed_y.append(step[OUTPUT_NAME])
            state = {st.input: step[st.output] for st in _states(plan)}
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(
            f"the wrapped graph does not run {steps} steps whole and one at a time: {_line(exc)}"
        ) from None
    checks = {
        "whole_vs_original": _worst(
            [(whole[OUTPUT_NAME], expected_y)]
            + [(whole[o], expected_finals[o]) for o in expected_finals]
        ),
        "streamed_vs_original": _worst(
            [(np.concatenate(streamed_y, axis=1), expected_y)]
            + [(state[st.input], expected_finals[st.output]) for st in _states(plan)]
        ),
    }
    for what, error in checks.items():
        if not error <= TOLERANCE:
            where = "run whole" if what.startswith("whole") else "streamed one step at a time"
            raise ImportRefused(
                f"the wrapped graph, {where}, differs from the original by "
                f"{error:.3g} (tolerance {TOLERANCE:g}): its outputs do not "
                "follow from its recurrent states alone, so it cannot be "
                "served step by step"
            )
    golden = {
        INPUT_NAME: x,
        **initial,
        "expected_y": expected_y,
        **{f"expected_{o}": v for o, v in expected_finals.items()},
    }
    return golden, {"tolerance": TOLERANCE, **checks}


def _with_outputs(original: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """The original, also returning each recurrent node's initial and final states, so the
    wrapped graph can start where the original's own state inputs put it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    graph = probe.graph
    extra = []
    for r in plan.recurrences:
        node = _same_node(graph, r.node, PREFIX)
        for st in r.states:
            if len(node.input) > st.fed_at and node.input[st.fed_at]:
                extra.append(
                    helper.make_node("Identity", [node.input[st.fed_at]], [f"probe_{st.input}"])
                )
                graph.output.append(
                    helper.make_tensor_value_info(f"probe_{st.input}", TensorProto.FLOAT, None)
                )
            extra.append(
                helper.make_node(
                    "Identity",
                    [_final_of(node, st, f"probe_{st.output}_raw")],
                    [f"probe_{st.output}"],
                )
            )
            graph.output.append(
                helper.make_tensor_value_info(f"probe_{st.output}", TensorProto.FLOAT, None)
            )
    graph.node.extend(extra)
    return probe


def _notes(plan: Plan) -> list[str]:
    loops = [r.node.name or "unnamed" for r in plan.recurrences if r.cell == LOOP]
    if not loops:
        return []
    return [
        f"served as it is: the recurrence {', '.join(loops)} is a generic Loop or Scan, whose "
        "body ONNX Runtime interprets node by node every timestep: several times slower "
        "per step than a native LSTM/GRU/RNN. For speed, export native recurrent ops "
        "(`python -m training export` for Keras models)."
    ]


def _states(plan: Plan) -> list[State]:
    return [st for r in plan.recurrences for st in r.states]


def _unstacked(value: np.ndarray, recurrence: Recurrence) -> np.ndarray:
    """A native op's [1, batch, size] (or [batch, 1, size]) state as [batch, size]."""
    axis = recurrence.directions_axis
    return value if axis is None else np.take(value, 0, axis=axis)


def _random_like(value: onnx.ValueInfoProto, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random values for one of the original's other inputs (its states): fixed dims as they
    are, the symbolic one is the batch."""
    dims = [
        d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim
    ]
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportRefused(
            f"input {value.name!r} is neither the sequence nor a float state; "
            "rnnserve feeds only x and recurrent states"
        )
    return (0.5 * rng.standard_normal(dims)).astype(np.float32)


def _worst(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return max(off_by(a, b) for a, b in pairs)


def _check_staged(directory: Path) -> None:
    """The server's own load checks, on the staged version."""
    try:
        check_model(OrtRunner(read_spec(directory), directory, "cpu", 1), directory)
    except ValueError as exc:
        raise ImportRefused(
            f"the wrapped graph fails the server's load checks: {_line(exc)}"
        ) from None


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:239] + "…"


def describe(directory: Path) -> str:
    """What `rnnserve import` prints: the version written and how to call it."""
    spec = json.loads((directory / "model.json").read_text())
    states = ", ".join(s["input"] for s in spec["states"])
    checks = spec["imported"]["verification"]
    return (
        f"wrote {directory}: {spec['layers']} recurrent op(s), x [batch, time, "
        f"{spec['input']['features']}] -> y [batch, time, {spec['output']['size']}], states "
        f"{states}; equal to the original within {checks['whole_vs_original']:.1e} whole and "
        f"{checks['streamed_vs_original']:.1e} streamed"
        + "".join(f"\nwarning: {note}" for note in spec["imported"]["notes"])
    )
