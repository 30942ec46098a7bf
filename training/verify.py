"""Export checks: ONNX Runtime equals Keras, streaming equals whole sequence, batch 1 equals 64.

Run at export time (a failing check stops the export) and again by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.models.checks import off_by
from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME

TOLERANCE = 1e-5
NATIVE_OPS = {"LSTM", "GRU", "RNN"}
FORBIDDEN_OPS = {"Loop", "Scan", "If"}


class VerificationError(AssertionError):
    """An export that does not reproduce the Keras model within TOLERANCE."""


@dataclass(frozen=True)
class Probe:
    """Random inputs in the model's domain, with random initial states."""

    x: np.ndarray
    states: dict[str, np.ndarray]

    def feeds(self) -> dict[str, np.ndarray]:
        return {INPUT_NAME: self.x, **self.states}


def make_probe(
    model: keras.Model, sample: np.ndarray, batch: int, time: int, seed: int = 0
) -> Probe:
    """Draw timesteps from `sample` (real [N, features] rows) so scaling sees realistic values."""
    rng = np.random.default_rng(seed)
    rows = sample.reshape(-1, sample.shape[-1])
    x = rows[rng.integers(0, len(rows), batch * time)].reshape(batch, time, -1)
    states = {
        t.name: rng.uniform(-0.5, 0.5, (batch, t.shape[-1])).astype("float32")
        for t in model.inputs[1:]
    }
    return Probe(x.astype("float32"), states)


def run_keras(model: keras.Model, probe: Probe) -> dict[str, np.ndarray]:
    outs = model([probe.x, *probe.states.values()], training=False)
    names = [OUTPUT_NAME] + [f"{n}_out" for n in probe.states]
    return {n: np.asarray(o) for n, o in zip(names, outs)}


def run_onnx(session: ort.InferenceSession, probe: Probe) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, probe.feeds())))


def run_streamed(session: ort.InferenceSession, probe: Probe) -> dict[str, np.ndarray]:
    """Step time = 1, feeding each step's final states back in."""
    states = dict(probe.states)
    ys = []
    for t in range(probe.x.shape[1]):
        out = run_onnx(session, Probe(probe.x[:, t : t + 1], states))
        ys.append(out[OUTPUT_NAME])
        states = {n: out[f"{n}_out"] for n in states}
    return {OUTPUT_NAME: np.concatenate(ys, axis=1), **{f"{n}_out": v for n, v in states.items()}}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The worst `off_by` over the outputs: atol = rtol = TOLERANCE in one number."""
    if a.keys() != b.keys():
        raise VerificationError(f"outputs differ: {sorted(a)} vs {sorted(b)}")
    return max(off_by(a[k], b[k]) for k in a)


def check_ops(proto: onnx.ModelProto) -> None:
    ops = {n.op_type for n in proto.graph.node}
    if ops & FORBIDDEN_OPS or not ops & NATIVE_OPS:
        raise VerificationError(f"graph must use native recurrent ops only, has {sorted(ops)}")


def verify_export(
    model: keras.Model, proto: onnx.ModelProto, sample: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Return the measured differences; raise VerificationError past TOLERANCE."""
    check_ops(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = make_probe(model, sample, batch=64, time=12, seed=seed)
    whole = run_onnx(session, probe)
    single = Probe(probe.x[:1], {k: v[:1] for k, v in probe.states.items()})
    report = {
        "onnx_vs_keras": max_diff(whole, run_keras(model, probe)),
        "streamed_vs_whole": max_diff(run_streamed(session, probe), whole),
        "batch1_vs_batch64": max_diff(
            run_onnx(session, single), {k: v[:1] for k, v in whole.items()}
        ),
    }
    failed = {k: v for k, v in report.items() if not v <= TOLERANCE}
    if failed:
        raise VerificationError(f"export is not exact (tolerance {TOLERANCE}): {failed}")
    return report
