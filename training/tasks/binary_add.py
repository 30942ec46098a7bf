"""Binary adder (seeds 002/003): two 8-bit numbers, LSB first, one sum bit per step."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME
from training.architecture import Architecture, zero_states
from training.tasks.base import Bar, Defaults
from training.trainer import Trainer

BITS = 8
LIMIT = 128  # a, b < 128, so a + b fits in 8 bits
BATCH = 64


def to_bits(values: np.ndarray) -> np.ndarray:
    """[...] ints → [..., BITS] bits, least significant first."""
    return ((values[..., None] >> np.arange(BITS)) & 1).astype("float32")


def encode(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [N, BITS, 2] and targets [N, BITS, 1] for the sums a + b."""
    return np.stack([to_bits(a), to_bits(b)], axis=-1), to_bits(a + b)[..., None]


class BinaryAddTask:
    name = "binary_add"
    description = (
        "8-bit binary adder: per step the bits of a and b (LSB first) in, "
        "the sum bit out (sigmoid)."
    )
    defaults = Defaults(cell="lstm", layers=2, units=20, epochs=2000)
    bar = Bar(
        "exact_sums", 1.0, True, "seed: loss 0.00079 at step 2000, every printed test sum exact"
    )

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def architecture(self, cell: str, layers: int, units: int, activation: str) -> Architecture:
        return Architecture(
            features=2,
            outputs=1,
            head="sigmoid",
            cell=cell,
            layers=layers,
            units=units,
            activation=activation,
        )

    def train(
        self, model: keras.Model, arch: Architecture, epochs: int
    ) -> tuple[list[float], dict[str, Any]]:
        """`epochs` counts steps here, each on fresh random pairs, as in the seed."""
        trainer = Trainer(
            model, keras.optimizers.Adam(0.01), keras.losses.MeanSquaredError(), self.name, epochs
        )
        states = zero_states(arch, BATCH)
        for _ in range(epochs):
            x, y = encode(self.rng.integers(0, LIMIT, BATCH), self.rng.integers(0, LIMIT, BATCH))
            trainer.step(x, y, states)
        setup = {
            "optimizer": "Adam(0.01)",
            "loss": "mean squared error",
            "batch": BATCH,
            "steps": epochs,
            "data": "fresh random pairs a, b < 128 each step",
        }
        return trainer.losses, setup

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        """All 128 × 128 pairs in one call; a sum counts only if every bit is right."""
        a, b = (g.reshape(-1) for g in np.meshgrid(np.arange(LIMIT), np.arange(LIMIT)))
        x, _ = encode(a, b)
        feeds = {
            INPUT_NAME: x,
            **{i.name: np.zeros((len(x), i.shape[1]), "float32") for i in session.get_inputs()[1:]},
        }
        (y,) = session.run([OUTPUT_NAME], feeds)
        sums = (np.rint(y[..., 0]).astype(int) << np.arange(BITS)).sum(axis=1)
        return {"exact_sums": float(np.mean(sums == a + b)), "pairs": float(len(a))}

    def sample(self) -> np.ndarray:
        return self.rng.integers(0, 2, (256, 2)).astype("float32")
