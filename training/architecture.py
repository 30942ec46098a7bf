"""The Keras model every task trains: scaling → stacked recurrent layers → per-timestep head.

The model takes the recurrent states as explicit inputs and returns the final states, so one
graph serves whole sequences and single steps alike; the exporter walks exactly this shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from rnnserve.models.contract import CELLS, state_names

RNN_LAYERS = {
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
    "simple_rnn": keras.layers.SimpleRNN,
}
HEAD_KIND = {"softmax": "probabilities", "sigmoid": "sigmoid", "linear": "regression"}


@dataclass(frozen=True)
class Architecture:
    features: int
    outputs: int
    head: str
    """Output activation: softmax, sigmoid or linear."""
    cell: str = "lstm"
    layers: int = 1
    units: int = 16
    activation: str = "tanh"
    input_scale: tuple[float, ...] = (1.0,)
    input_offset: tuple[float, ...] = (0.0,)
    output_scale: float = 1.0
    output_offset: float = 0.0
    residual: bool = False
    """Add the input to the (scaled) output: the head predicts a change, not a level."""

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"--cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.head not in HEAD_KIND:
            raise ValueError(f"head must be one of {', '.join(HEAD_KIND)}")
        if self.layers < 1 or self.units < 1:
            raise ValueError("--layers and --units must be at least 1")
        if self.residual and self.features != self.outputs:
            raise ValueError("a residual head needs as many outputs as input features")

    @property
    def output_kind(self) -> str:
        return HEAD_KIND[self.head]

    def state_layout(self) -> list[tuple[str, str]]:
        return [pair for layer in range(self.layers) for pair in state_names(self.cell, layer)]


def build_model(arch: Architecture) -> keras.Model:
    """Inputs [x, *states], outputs [y, *final states], states in layer order (h, c per layer)."""
    x = keras.Input((None, arch.features), name="x")
    state_inputs = [keras.Input((arch.units,), name=name) for name, _ in arch.state_layout()]
    per_layer = 2 if arch.cell == "lstm" else 1
    h = keras.layers.Rescaling(
        np.asarray(arch.input_scale, "float32"),
        np.asarray(arch.input_offset, "float32"),
        name="scale_in",
    )(x)
    final_states = []
    for i in range(arch.layers):
        layer = RNN_LAYERS[arch.cell](
            arch.units,
            activation=arch.activation,
            return_sequences=True,
            return_state=True,
            name=f"rnn_{i}",
        )
        h, *states = layer(h, initial_state=state_inputs[i * per_layer : (i + 1) * per_layer])
        final_states += states
    y = keras.layers.Dense(arch.outputs, activation=arch.head, name="head")(h)
    if arch.output_scale != 1.0 or arch.output_offset != 0.0:
        y = keras.layers.Rescaling(arch.output_scale, arch.output_offset, name="scale_out")(y)
    if arch.residual:
        y = keras.layers.Add(name="residual")([x, y])
    return keras.Model([x, *state_inputs], [y, *final_states], name="rnnserve")


def zero_states(arch: Architecture, batch: int) -> list[np.ndarray]:
    return [np.zeros((batch, arch.units), "float32") for _ in arch.state_layout()]
