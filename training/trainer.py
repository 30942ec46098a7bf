"""One compiled training step over the state-in/state-out model, with progress lines.

Training through the same inputs the server feeds (x plus explicit states) lets the echo task
carry the state from window to window exactly as the seed's truncated BPTT did.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class Trainer:
    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: LossFn,
        label: str,
        total_steps: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.label = label
        self.total_steps = total_steps
        self.losses: list[float] = []
        self._started = time.monotonic()
        self._step = tf.function(self._train_step, reduce_retracing=True)

    def _train_step(self, x: tf.Tensor, y: tf.Tensor, states: Sequence[tf.Tensor]):
        with tf.GradientTape() as tape:
            y_pred, *finals = self.model([x, *states], training=True)
            loss = self.loss_fn(y, y_pred)
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, finals

    def step(self, x: np.ndarray, y: np.ndarray, states: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Train on one batch; return the final states (for stateful callers)."""
        loss, finals = self._step(tf.constant(x), tf.constant(y), [tf.constant(s) for s in states])
        self.losses.append(float(loss))
        n = len(self.losses)
        if n == 1 or n % max(1, self.total_steps // 20) == 0 or n == self.total_steps:
            recent = float(np.mean(self.losses[-50:]))
            print(
                f"[{self.label}] step {n}/{self.total_steps} loss {recent:.5f} "
                f"({time.monotonic() - self._started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        return [np.asarray(f) for f in finals]
