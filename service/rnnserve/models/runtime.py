"""What the engine and the session stores need of a model runtime: the `Runner` protocol.

ONNX Runtime's runner (`runner.OrtRunner`) is the one rnnserve ships. Another runtime is one
class that satisfies this protocol, chosen where the registry loads a version
(`ModelRegistry(runner=...)`); host-side session state (`state.state_store.StateStore`) works
with any. Device-resident state binds ONNX Runtime values, so it needs an `OrtRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rnnserve.models.contract import ModelSpec


@dataclass(frozen=True)
class GraphTensor:
    """An input or output of the loaded graph, as the runtime reports it."""

    name: str
    type: str
    """ONNX's type string: "tensor(float)" for the float32 tensors rnnserve serves."""
    shape: list[int | str | None] | None
    """Each dimension's size, or a symbolic name or None when it is not fixed; None when the
    rank is unknown."""


class HostBuffers(Protocol):
    """Arrays a runner keeps for one run shape: fill x and states, run, read y and finals."""

    x: np.ndarray
    states: list[np.ndarray]
    y: np.ndarray
    finals: list[np.ndarray]


class Runner(Protocol):
    """One model version, loaded: x [rows, k, features] and states in, y and final states out,
    exactly, for any rows and k."""

    spec: ModelSpec
    provider: str
    """What runs it, for the logs (ONNX Runtime's execution provider)."""
    device_type: str
    """Where its tensors live: "cpu", or "cuda" (session state may then stay there)."""
    state_inputs: list[str]
    outputs: list[str]
    """y's name, then each state's final output, in the model's order."""

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """A run from arrays of the caller's, into new ones; any thread."""
        ...

    def buffers(self, rows: int, steps: int) -> HostBuffers | None:
        """Kept buffers for a [rows, steps] run, or None (run with `run`). Event-loop runs
        only: one run uses them at a time."""
        ...

    def run_bound(self, buffers: HostBuffers) -> None:
        """A run from `buffers` (as `buffers` gave them) into the same buffers."""
        ...

    def signature(self) -> tuple[list[GraphTensor], list[GraphTensor]]:
        """The graph's inputs and outputs, for the checks at load."""
        ...
