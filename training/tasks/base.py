"""What every task provides to the export pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import keras
import numpy as np
import onnxruntime as ort

from training.architecture import Architecture


@dataclass(frozen=True)
class Defaults:
    """The set-up that `make train` exports; every field can be overridden on the command line."""

    cell: str
    layers: int
    units: int
    epochs: int
    activation: str = "tanh"


@dataclass(frozen=True)
class Bar:
    """The figure a task's exported model must reach, next to the seed's published one."""

    metric: str
    threshold: float
    higher_is_better: bool
    seed_figure: str

    def passed(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


class Task(Protocol):
    name: str
    description: str
    defaults: Defaults
    bar: Bar

    def architecture(self, cell: str, layers: int, units: int, activation: str) -> Architecture:
        """The model shape, with this task's data scaling baked into the graph."""

    def train(
        self, model: keras.Model, arch: Architecture, epochs: int
    ) -> tuple[list[float], dict[str, Any]]:
        """Train in place; return the loss per step and the training set-up to record."""

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        """Measure the bar metric (and friends) on the exported graph."""

    def sample(self) -> np.ndarray:
        """Real input rows [N, features] for probes and golden vectors."""
