"""Echo RNN (seed 001): output the input bit from 3 steps earlier; the canonical streaming task."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME
from training.architecture import Architecture, zero_states
from training.tasks.base import Bar, Defaults
from training.trainer import Trainer

ECHO_STEP = 3
SERIES_LENGTH = 50_000
ROWS = 5
WINDOW = 15


def echo_targets(bits: np.ndarray) -> np.ndarray:
    """The input delayed by ECHO_STEP along the last axis; the first targets are 0."""
    target = np.zeros_like(bits)
    target[..., ECHO_STEP:] = bits[..., :-ECHO_STEP]
    return target


class EchoTask:
    name = "echo"
    description = "Echo RNN: returns the input bit from 3 steps earlier (2 class probabilities)."
    defaults = Defaults(cell="simple_rnn", layers=1, units=4, epochs=20)
    bar = Bar(
        "stream_accuracy", 0.999, True, "seed: loss falls close to zero (no accuracy published)"
    )

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def architecture(self, cell: str, layers: int, units: int, activation: str) -> Architecture:
        return Architecture(
            features=1,
            outputs=2,
            head="softmax",
            cell=cell,
            layers=layers,
            units=units,
            activation=activation,
        )

    def train(
        self, model: keras.Model, arch: Architecture, epochs: int
    ) -> tuple[list[float], dict[str, Any]]:
        windows = SERIES_LENGTH // ROWS // WINDOW
        trainer = Trainer(
            model,
            keras.optimizers.Adagrad(0.3),
            keras.losses.SparseCategoricalCrossentropy(),
            self.name,
            epochs * windows,
        )
        for _ in range(epochs):
            bits = self.rng.integers(0, 2, (ROWS, SERIES_LENGTH // ROWS)).astype("float32")
            target = echo_targets(bits)
            states = zero_states(arch, ROWS)  # reset each epoch, as in the seed
            for w in range(windows):
                cut = slice(w * WINDOW, (w + 1) * WINDOW)
                states = trainer.step(bits[:, cut, None], target[:, cut], states)
        setup = {
            "optimizer": "Adagrad(0.3)",
            "loss": "sparse categorical cross-entropy",
            "series_length": SERIES_LENGTH,
            "batch_rows": ROWS,
            "truncated_backprop_length": WINDOW,
            "state_carried_between_windows": True,
            "epochs": epochs,
        }
        return trainer.losses, setup

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        """Stream 10,000 fresh bits one step at a time from zero state; score steps ≥ 3."""
        bits = np.random.default_rng(1234).integers(0, 2, 10_000).astype("float32")
        states = {i.name: np.zeros((1, i.shape[1]), "float32") for i in session.get_inputs()[1:]}
        names = [o.name for o in session.get_outputs()]
        predicted = np.empty(len(bits))
        for t, bit in enumerate(bits):
            out = dict(zip(names, session.run(names, {INPUT_NAME: bit.reshape(1, 1, 1), **states})))
            predicted[t] = out[OUTPUT_NAME][0, 0].argmax()
            states = {n: out[f"{n}_out"] for n in states}
        correct = predicted[ECHO_STEP:] == echo_targets(bits)[ECHO_STEP:]
        return {"stream_accuracy": float(correct.mean()), "streamed_bits": float(len(bits))}

    def sample(self) -> np.ndarray:
        return self.rng.integers(0, 2, (256, 1)).astype("float32")
