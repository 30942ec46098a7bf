"""Row-by-row digit classifier (seed 000): each image row is one timestep of raw pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME
from training.architecture import Architecture, zero_states
from training.tasks.base import Bar, Defaults
from training.trainer import Trainer

BATCH = 100


def load_digits(mnist: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(x_train, y_train, x_test, y_test, pixel max): sklearn's bundled set unless mnist.npz."""
    if mnist is not None:
        with np.load(mnist) as data:
            return (
                data["x_train"].astype("float32"),
                data["y_train"].astype("int64"),
                data["x_test"].astype("float32"),
                data["y_test"].astype("int64"),
                255.0,
            )
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images.astype("float32"),
        digits.target,
        test_size=0.25,
        random_state=0,
        stratify=digits.target,
    )
    return x_train, y_train, x_test, y_test, 16.0


class DigitsTask:
    name = "digits"
    description = (
        "Digit classifier reading an image one pixel row per step "
        "(raw 0-16 pixels of scikit-learn's 8x8 digits); 10 class probabilities."
    )
    defaults = Defaults(cell="simple_rnn", layers=1, units=16, epochs=60, activation="relu")
    bar = Bar("test_accuracy", 0.90, True, "seed: test accuracy 0.8379 on MNIST 28x28")

    def __init__(self, seed: int = 0, mnist: Path | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.x_train, self.y_train, self.x_test, self.y_test, self.pixel_max = load_digits(mnist)

    def architecture(self, cell: str, layers: int, units: int, activation: str) -> Architecture:
        width = self.x_train.shape[-1]
        return Architecture(
            features=width,
            outputs=10,
            head="softmax",
            cell=cell,
            layers=layers,
            units=units,
            activation=activation,
            input_scale=(1.0 / self.pixel_max,) * width,
            input_offset=(0.0,) * width,
        )

    def train(
        self, model: keras.Model, arch: Architecture, epochs: int
    ) -> tuple[list[float], dict[str, Any]]:
        ce = keras.losses.SparseCategoricalCrossentropy()
        batches = int(np.ceil(len(self.x_train) / BATCH))
        trainer = Trainer(
            model,
            keras.optimizers.RMSprop(0.01),
            lambda y, y_pred: ce(y, y_pred[:, -1]),
            self.name,
            epochs * batches,
        )
        for _ in range(epochs):
            order = self.rng.permutation(len(self.x_train))
            for i in range(batches):
                idx = order[i * BATCH : (i + 1) * BATCH]
                trainer.step(self.x_train[idx], self.y_train[idx], zero_states(arch, len(idx)))
        setup = {
            "optimizer": "RMSprop(0.01)",
            "loss": "categorical cross-entropy on the last row",
            "batch": BATCH,
            "epochs": epochs,
            "train_images": int(len(self.x_train)),
            "test_images": int(len(self.x_test)),
        }
        return trainer.losses, setup

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        feeds = {
            INPUT_NAME: self.x_test,
            **{
                i.name: np.zeros((len(self.x_test), i.shape[1]), "float32")
                for i in session.get_inputs()[1:]
            },
        }
        (y,) = session.run([OUTPUT_NAME], feeds)
        return {"test_accuracy": float(np.mean(y[:, -1].argmax(-1) == self.y_test))}

    def sample(self) -> np.ndarray:
        return self.x_test.reshape(-1, self.x_test.shape[-1])
