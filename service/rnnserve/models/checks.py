"""Proves a loaded version is what its model.json says before it may serve: the graph's inputs
and outputs, a warm-up run's shapes and values, and golden.npz's expected outputs when present.

A version that fails is never served and so never becomes a model's latest version; the reason
goes to the log once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from rnnserve.models.contract import GOLDEN_FILE, INPUT_NAME, OUTPUT_NAME
from rnnserve.models.runtime import Runner

GOLDEN_TOLERANCE = 1e-5
MAX_GOLDEN_BYTES = 16 * 1024 * 1024
WARM_UP = ((1, 1), (8, 3))
"""(rows, timesteps) of the warm-up runs: the first run allocates, so pay it at load."""


def off_by(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / (1 + |want|): absolute below magnitude 1, relative above it (float32
    spacing at 370 ppm is 3e-5, so a purely absolute 1e-5 would be unreachable there). The one
    measure of the golden check, `rnnserve import` and the training export checks."""
    return float(np.max(np.abs(got - want) / (1 + np.abs(want))))


def check_model(runner: Runner, directory: Path) -> None:
    """ValueError with a one-line reason if the graph disagrees with its model.json."""
    _check_graph(runner)
    for rows, steps in WARM_UP:
        _check_run(runner, rows, steps)
    golden = directory / GOLDEN_FILE
    if golden.is_file():
        _check_golden(runner, golden)


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_graph(runner: Runner) -> None:
    spec = runner.spec
    graph_inputs, graph_outputs = runner.signature()
    inputs = {i.name: i for i in graph_inputs}
    outputs = {o.name: o for o in graph_outputs}
    expected_inputs = [INPUT_NAME, *runner.state_inputs]
    if sorted(inputs) != sorted(expected_inputs):
        raise ValueError(
            f"graph inputs {sorted(inputs)} do not match model.json {sorted(expected_inputs)}"
        )
    missing = [name for name in runner.outputs if name not in outputs]
    if missing:
        raise ValueError(
            f"graph lacks the outputs {missing} that model.json declares; it has {sorted(outputs)}"
        )
    declared = {
        INPUT_NAME: (3, spec.features),
        OUTPUT_NAME: (3, spec.outputs),
        **{s.input: (2, s.size) for s in spec.states},
        **{s.output: (2, s.size) for s in spec.states},
    }
    for name, (rank, last) in declared.items():
        arg = inputs.get(name) or outputs[name]
        if arg.type != "tensor(float)":
            raise ValueError(f"graph {name!r} is {arg.type}; rnnserve serves float32 tensors")
        shape = arg.shape
        if shape is not None and len(shape) != rank:
            raise ValueError(f"graph {name!r} has rank {len(shape)}, model.json implies {rank}")
        if shape and _static(shape[-1]) not in (None, last):
            raise ValueError(
                f"graph {name!r} has {shape[-1]} values per row; model.json says {last}"
            )


def _check_run(runner: Runner, rows: int, steps: int) -> None:
    spec = runner.spec
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (rows, steps, spec.features)).astype(np.float32)
    y, finals = runner.run(x, [np.zeros((rows, s.size), np.float32) for s in spec.states])
    if y.shape != (rows, steps, spec.outputs):
        raise ValueError(
            f"a [{rows}, {steps}, {spec.features}] run gave y of shape "
            f"{list(y.shape)}, not [{rows}, {steps}, {spec.outputs}] as declared"
        )
    for state, final in zip(spec.states, finals):
        if final.shape != (rows, state.size):
            raise ValueError(
                f"a {rows}-row run gave {state.output} of shape {list(final.shape)}"
                f", not [{rows}, {state.size}] as declared"
            )
    if not np.isfinite(y).all() or not all(np.isfinite(f).all() for f in finals):
        raise ValueError("a warm-up run on inputs in [-1, 1] gave NaN or Inf")


def _check_golden(runner: Runner, path: Path) -> None:
    spec = runner.spec
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise ValueError(f"{GOLDEN_FILE} is larger than {MAX_GOLDEN_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as data:
            golden = {name: np.asarray(data[name], np.float32) for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{GOLDEN_FILE} cannot be read: {exc}") from None
    needed = [
        INPUT_NAME,
        "expected_y",
        *runner.state_inputs,
        *(f"expected_{s.output}" for s in spec.states),
    ]
    absent = [name for name in needed if name not in golden]
    if absent:
        raise ValueError(f"{GOLDEN_FILE} lacks {absent}")
    x = golden[INPUT_NAME]
    rows = x.shape[0] if x.ndim == 3 else 0
    if (
        x.ndim != 3
        or x.shape[2] != spec.features
        or any(golden[s.input].shape != (rows, s.size) for s in spec.states)
    ):
        raise ValueError(f"{GOLDEN_FILE} inputs do not fit the declared shapes")
    y, finals = runner.run(x, [golden[s.input] for s in spec.states])
    pairs = [
        ("y", y, golden["expected_y"]),
        *((s.output, f, golden[f"expected_{s.output}"]) for s, f in zip(spec.states, finals)),
    ]
    for name, got, want in pairs:
        if got.shape != want.shape:
            raise ValueError(
                f"{GOLDEN_FILE}: {name} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        error = off_by(got, want)
        if not error <= GOLDEN_TOLERANCE:
            raise ValueError(
                f"the graph disagrees with {GOLDEN_FILE}: {name} is off by "
                f"{error:.3g} (tolerance {GOLDEN_TOLERANCE:g})"
            )
