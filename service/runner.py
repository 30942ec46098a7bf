"""ONNX Runtime session for one model version: x plus states in, y plus final states out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, ModelSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"--device cuda, but this ONNX Runtime offers only {available}")
        return [CUDA, CPU]
    if device == "auto" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class Runner:
    def __init__(self, spec: ModelSpec, directory: Path, device: str, intra_op_threads: int):
        options = ort.SessionOptions()
        # Tiny recurrent graphs: thread hand-offs cost more than they save, and the sequential
        # executor avoids the parallel executor's scheduling overhead.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.spec = spec
        self.session = ort.InferenceSession(str(directory / MODEL_FILE), options,
                                            providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        self.state_inputs = [s.input for s in spec.states]
        self.outputs = [OUTPUT_NAME, *(s.output for s in spec.states)]
        self._check_signature()

    def _check_signature(self) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected = {INPUT_NAME, *self.state_inputs}
        if set(inputs) != expected:
            raise ValueError(f"{self.spec.name} v{self.spec.version}: graph inputs {sorted(inputs)}"
                             f" do not match model.json {sorted(expected)}")
        if inputs[INPUT_NAME][-1] != self.spec.features:
            raise ValueError(f"{self.spec.name}: graph takes {inputs[INPUT_NAME][-1]} features, "
                             f"model.json says {self.spec.features}")

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {INPUT_NAME: x, **dict(zip(self.state_inputs, states))}
        y, *finals = self.session.run(self.outputs, feeds)
        return y, finals

    def warm_up(self) -> None:
        """First runs allocate ORT's buffers; pay that at load, not on a user's first step."""
        for batch in (1, 8):
            x = np.zeros((batch, 1, self.spec.features), np.float32)
            self.run(x, [np.zeros((batch, s.size), np.float32) for s in self.spec.states])
