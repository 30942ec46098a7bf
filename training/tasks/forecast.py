"""Next-week CO2 forecaster: a GRU reads the Mauna Loa weekly series one ppm value per step."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME
from training.architecture import Architecture, zero_states
from training.tasks.base import Bar, Defaults
from training.trainer import Trainer

TRAIN_FRACTION = 0.8
WINDOW = 156  # three years of weeks per training sequence
WARMUP = 26  # steps the loss ignores while the state settles
BATCH = 32
# The held-out years sit above every training level; shifting each training window by a random
# offset teaches the model to read changes, not absolute levels (without it: 2.6x naive RMSE).
LEVEL_SHIFT_PPM = (-20.0, 40.0)


def load_co2() -> np.ndarray:
    """statsmodels' bundled weekly series (ships offline), gaps filled by linear interpolation."""
    from statsmodels.datasets import co2

    return co2.load_pandas().data["co2"].interpolate(method="linear").to_numpy("float32")


class ForecastTask:
    name = "forecast"
    description = "Next-week CO2 forecaster: raw weekly ppm in, next week's ppm out (regression)."
    defaults = Defaults(cell="gru", layers=1, units=32, epochs=40)
    bar = Bar(
        "rmse_vs_naive",
        0.9,
        False,
        "seed: none (rnnserve's own GRU task); bar is 0.9 x naive last-value RMSE",
    )

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.series = load_co2()
        self.split = int(len(self.series) * TRAIN_FRACTION)
        train = self.series[: self.split]
        self.level_mean, self.level_std = float(train.mean()), float(train.std())
        self.delta_std = float(np.diff(train).std())

    def architecture(self, cell: str, layers: int, units: int, activation: str) -> Architecture:
        return Architecture(
            features=1,
            outputs=1,
            head="linear",
            cell=cell,
            layers=layers,
            units=units,
            activation=activation,
            input_scale=(1.0 / self.level_std,),
            input_offset=(-self.level_mean / self.level_std,),
            output_scale=self.delta_std,
            residual=True,
        )

    def train(
        self, model: keras.Model, arch: Architecture, epochs: int
    ) -> tuple[list[float], dict[str, Any]]:
        train = self.series[: self.split]
        starts_per_epoch = (len(train) - WINDOW - 1) // BATCH
        scale = self.delta_std

        def loss(y, y_pred):
            return keras.ops.mean(keras.ops.square((y - y_pred)[:, WARMUP:] / scale))

        trainer = Trainer(
            model, keras.optimizers.Adam(0.005), loss, self.name, epochs * starts_per_epoch
        )
        for _ in range(epochs):
            for _ in range(starts_per_epoch):
                starts = self.rng.integers(0, len(train) - WINDOW - 1, BATCH)
                idx = starts[:, None] + np.arange(WINDOW)
                shift = self.rng.uniform(*LEVEL_SHIFT_PPM, (BATCH, 1)).astype("float32")
                trainer.step(
                    (train[idx] + shift)[..., None],
                    (train[idx + 1] + shift)[..., None],
                    zero_states(arch, BATCH),
                )
        setup = {
            "optimizer": "Adam(0.005)",
            "loss": "MSE of the weekly change (scaled)",
            "window_weeks": WINDOW,
            "warmup_weeks": WARMUP,
            "batch": BATCH,
            "epochs": epochs,
            "train_weeks": self.split,
            "level_shift_augmentation_ppm": list(LEVEL_SHIFT_PPM),
            "series": "statsmodels co2 (weekly, Mauna Loa), linear gap fill",
        }
        return trainer.losses, setup

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        """Stream the whole series from zero state; score the held-out last 20 %."""
        feeds = {
            INPUT_NAME: self.series[None, :, None],
            **{i.name: np.zeros((1, i.shape[1]), "float32") for i in session.get_inputs()[1:]},
        }
        (y,) = session.run([OUTPUT_NAME], feeds)
        predicted, actual = y[0, self.split - 1 : -1, 0], self.series[self.split :]
        naive = self.series[self.split - 1 : -1]
        rmse = float(np.sqrt(np.mean((predicted - actual) ** 2)))
        naive_rmse = float(np.sqrt(np.mean((naive - actual) ** 2)))
        return {"rmse_vs_naive": rmse / naive_rmse, "rmse_ppm": rmse, "naive_rmse_ppm": naive_rmse}

    def sample(self) -> np.ndarray:
        return self.series[:, None]
