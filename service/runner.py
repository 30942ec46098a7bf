"""ONNX Runtime session for one model version: x plus states in, y plus final states out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, ModelSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
BOUND_MAX_STEPS = 1024
"""Runs of up to this many timesteps (rows x steps) use preallocated, pre-bound buffers."""
BOUND_SHAPES = 32
"""Distinct (rows, steps) shapes whose buffers are kept, least recently used dropped first."""


@dataclass(eq=False)
class Buffers:
    """Inputs to fill and outputs to read for one run shape, bound to the session once.

    Between gRPC messages a bound run costs the server 7-12 % less CPU per step than
    `session.run` (bench/streaming.py's two echo + ORT floors), so every small run on the event
    loop goes through these.
    """

    binding: ort.IOBinding
    x: np.ndarray
    states: list[np.ndarray]
    y: np.ndarray
    finals: list[np.ndarray]


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
        # The arena keeps a large run's peak for the life of the process (1.2 GB after one
        # 65536x31 forecast run; 94 MB without). Without it a one-step run costs the same
        # (17.6 vs 18.0 µs in a loop), so memory goes back to the system after every run.
        options.enable_cpu_mem_arena = False
        self.spec = spec
        self.session = ort.InferenceSession(str(directory / MODEL_FILE), options,
                                            providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        self.state_inputs = [s.input for s in spec.states]
        self.outputs = [OUTPUT_NAME, *(s.output for s in spec.states)]
        self._bound: dict[tuple[int, int], Buffers] = {}

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {INPUT_NAME: x, **dict(zip(self.state_inputs, states))}
        y, *finals = self.session.run(self.outputs, feeds)
        return y, finals

    def buffers(self, rows: int, steps: int) -> Buffers | None:
        """Bound buffers for a [rows, steps] run, or None over BOUND_MAX_STEPS (large runs
        allocate; their run time dwarfs it). Event-loop runs only: one run uses them at a time."""
        if rows * steps > BOUND_MAX_STEPS:
            return None
        key = (rows, steps)
        buffers = self._bound.pop(key, None)
        if buffers is None:
            buffers = self.bind(rows, steps)
            if len(self._bound) >= BOUND_SHAPES:
                del self._bound[next(iter(self._bound))]  # the least recently used shape
        self._bound[key] = buffers
        return buffers

    def bind(self, rows: int, steps: int) -> Buffers:
        """New buffers for [rows, steps] runs, owned by the caller."""
        spec = self.spec
        buffers = Buffers(self.session.io_binding(),
                          np.zeros((rows, steps, spec.features), np.float32),
                          [np.zeros((rows, s.size), np.float32) for s in spec.states],
                          np.zeros((rows, steps, spec.outputs), np.float32),
                          [np.zeros((rows, s.size), np.float32) for s in spec.states])
        for name, array in ((INPUT_NAME, buffers.x), *zip(self.state_inputs, buffers.states)):
            buffers.binding.bind_cpu_input(name, array)
        for name, array in zip(self.outputs, (buffers.y, *buffers.finals)):
            buffers.binding.bind_output(name, "cpu", 0, np.float32, list(array.shape),
                                        array.ctypes.data)
        return buffers

    def run_bound(self, buffers: Buffers) -> None:
        """One run from buffers.x and .states into buffers.y and .finals."""
        self.session.run_with_iobinding(buffers.binding)
