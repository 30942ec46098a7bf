"""`python -m training export MODEL.keras`: a Keras model trained anywhere, through the same
native-op exporter and checks as rnnserve's own.

A saved model takes x only and keeps its states inside (and often returns only the last step).
Serving needs them outside, so the model is rebuilt, sharing its weights, in the form
`build_model` gives: x plus one input per state tensor, every recurrent layer returning its
whole sequence and its final states. A many-to-one model then answers at every step; its last
step's answer is the original's answer (the checks below hold it to 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from rnnserve.models.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelSpec,
    StateSpec,
    state_names,
    version_dir,
    write_version,
)
from training.architecture import HEAD_KIND, RNN_LAYERS
from training.onnx_export import OPSET, ExportError, to_onnx
from training.verify import TOLERANCE, make_probe, max_diff, run_keras, verify_export

RECURRENT = {layer.__name__: cell for cell, layer in RNN_LAYERS.items()}
"""Keras layer class name -> model.json cell."""
PASS_THROUGH = {"InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise"}
"""Layers that do nothing at inference."""


def export_saved(path: Path, name: str, version: int, out: Path, description: str = "") -> Path:
    """Write out/name/version/ for the saved model; ExportError (nothing written) if it cannot
    be served exactly."""
    target = version_dir(out, name, version)
    if target.exists():
        raise ExportError(f"{target} already exists; pick another --version")
    try:
        original = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ExportError(f"{path} cannot be loaded by Keras: {exc}") from None
    streaming, cells, kinds = _streaming(original)
    proto = to_onnx(streaming)
    features = int(streaming.inputs[0].shape[-1])
    sample = np.random.default_rng(0).standard_normal((4096, features)).astype(np.float32)
    checks = verify_export(streaming, proto, sample)
    checks["last_step_vs_original"] = _same_answers(original, streaming)
    if not checks["last_step_vs_original"] <= TOLERANCE:
        raise ExportError(
            f"the rebuilt model's last step differs from the saved model by "
            f"{checks['last_step_vs_original']:.3g}"
        )
    units = [int(t.shape[-1]) for t in streaming.inputs[1:]]
    spec = ModelSpec(
        name=name,
        version=version,
        task="keras",
        description=description or f"exported from {path.name} ({', '.join(kinds)})",
        cell=cells[0],
        layers=len(cells),
        units=max(units),
        features=features,
        outputs=int(streaming.outputs[0].shape[-1]),
        output_kind=_output_kind(original),
        states=tuple(
            StateSpec(t.name, f"{t.name}_out", size)
            for t, size in zip(streaming.inputs[1:], units, strict=True)
        ),
        extra={
            "exported": {"source": path.name, "layers": kinds},
            "verification": {**checks, "tolerance": TOLERANCE},
            "onnx": {"opset": OPSET, "ops": sorted({n.op_type for n in proto.graph.node})},
        },
    )
    golden = make_probe(streaming, sample, batch=4, time=10, seed=1)
    expected = run_keras(streaming, golden)
    write_version(
        target,
        proto.SerializeToString(),
        spec,
        {
            INPUT_NAME: golden.x,
            **golden.states,
            **{f"expected_{k}": v for k, v in expected.items()},
        },
    )
    print(json.dumps({"model": name, "version": version, "verification": checks}))
    return target


def _streaming(original: keras.Model) -> tuple[keras.Model, list[str], list[str]]:
    """The model with its states outside: (model, cell per recurrent layer, layer kinds)."""
    layers = [layer for layer in original.layers if type(layer).__name__ not in PASS_THROUGH]
    if not original.inputs or len(original.inputs) != 1 or len(original.outputs) != 1:
        raise ExportError("the model must take one sequence input and give one output")
    shape = original.inputs[0].shape
    if len(shape) != 3 or shape[-1] is None:
        raise ExportError(f"its input must be [batch, time, features], got {tuple(shape)}")
    x = keras.Input((None, shape[-1]), name=INPUT_NAME)
    h, state_inputs, finals, cells, kinds = x, [], [], [], []
    for layer in layers:
        kind = type(layer).__name__
        kinds.append(kind)
        if kind in RECURRENT:
            cell = RECURRENT[kind]
            rebuilt = type(layer).from_config(
                {
                    **layer.get_config(),
                    "return_sequences": True,
                    "return_state": True,
                    "stateful": False,
                }
            )
            own = [
                keras.Input((layer.units,), name=state)
                for state, _ in state_names(cell, len(cells))
            ]
            h, *states = rebuilt(h, initial_state=own)
            rebuilt.set_weights(layer.get_weights())
            state_inputs += own
            finals += states
            cells.append(cell)
        elif kind in ("Dense", "Activation"):
            h = layer(h)
        else:
            raise ExportError(
                f"layer {layer.name!r} of type {kind} cannot be served step by "
                "step (supported: LSTM, GRU, SimpleRNN, Dense, Activation, "
                "Dropout)"
            )
    if not cells:
        raise ExportError("the model has no LSTM, GRU or SimpleRNN layer")
    return keras.Model([x, *state_inputs], [h, *finals]), cells, kinds


def _same_answers(original: keras.Model, streaming: keras.Model) -> float:
    """The original's output against the rebuilt model's (its last step, for a many-to-one
    model), from zero states, on random sequences."""
    features = int(original.inputs[0].shape[-1])
    x = np.random.default_rng(3).standard_normal((8, 11, features)).astype(np.float32)
    want = np.asarray(original(x, training=False))
    zeros = [np.zeros((8, int(t.shape[-1])), np.float32) for t in streaming.inputs[1:]]
    got = np.asarray(streaming([x, *zeros], training=False)[0])
    if want.ndim == 2:
        got = got[:, -1]
    return max_diff({OUTPUT_NAME: got}, {OUTPUT_NAME: want})


def _output_kind(model: keras.Model) -> str:
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "linear")
    return HEAD_KIND.get(activation, "regression")
