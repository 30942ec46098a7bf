"""The ONNX Runtime runner (`OrtRunner`): one model version's session, x plus states in, y plus
final states out; it satisfies `runtime.Runner`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import numpy as np
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, ModelSpec
from rnnserve.models.runtime import GraphTensor, HostBuffers

log = logging.getLogger(__name__)
T = TypeVar("T")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA_EXACT = (CUDA, {"use_tf32": "0"})
"""TF32 matmuls (ONNX Runtime's CUDA default on Ampere and later) keep 10 mantissa bits: outputs
would drift ~1e-3 from CPU's, past the 1e-5 the models are verified to."""
BOUND_MAX_STEPS = 1024
"""Runs of up to this many timesteps (rows x steps) use preallocated, pre-bound buffers."""
BOUND_SHAPES = 32
"""Distinct (rows, steps) shapes whose buffers are kept, least recently used dropped first."""


@dataclass(eq=False)
class Buffers:
    """Inputs to fill and outputs to read for one run shape, bound to the session once.

    Between gRPC messages a bound run costs the server less CPU per step than `session.run`
    (bench/streaming.py's two echo + ORT floors; docs/benchmarks.md), so every small run on the
    event loop goes through these.
    """

    binding: ort.IOBinding
    x: np.ndarray
    states: list[np.ndarray]
    y: np.ndarray
    finals: list[np.ndarray]
    uploads: list[tuple[ort.OrtValue, np.ndarray]] = field(default_factory=list)
    """Host inputs the run reads through values of the provider's own (see bind_host)."""


class Bound(Protocol):
    """What a bound run needs: Buffers here, DeviceBuffers with the state on the device."""

    x: np.ndarray

    binding: ort.IOBinding
    uploads: list[tuple[ort.OrtValue, np.ndarray]]


def bind_host(
    binding: ort.IOBinding,
    name: str,
    array: np.ndarray,
    device: str,
    uploads: list[tuple[ort.OrtValue, np.ndarray]],
) -> None:
    """Bind a host array that is refilled before every run. On CPU it is bound as it is and
    read at each run. Elsewhere IOBinding copies a host input to the device once, when it is
    bound (on CUDA every step saw the first step's x), so the array gets a device value of its
    own, refreshed from it before each run (`uploads`, done by OrtRunner.run_bound)."""
    if device == "cpu":
        binding.bind_cpu_input(name, array)
    else:
        bind_uploaded(binding, name, array, device, uploads)


def bind_uploaded(
    binding: ort.IOBinding,
    name: str,
    array: np.ndarray,
    device: str,
    uploads: list[tuple[ort.OrtValue, np.ndarray]],
) -> None:
    """Bind a value of `device`'s own for a host array, refreshed from it before each run."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype.type, device, 0)
    binding.bind_ortvalue_input(name, value)
    uploads.append((value, array))


class ShapeCache(Generic[T]):
    """Buffers per run shape, made on first use; past `limit` shapes the least recently used
    one is dropped (a client sending ever-new shapes cannot grow it)."""

    def __init__(self, make: Callable[..., T], limit: int = BOUND_SHAPES) -> None:
        self._make = make
        self._limit = limit
        self._kept: dict[Hashable, T] = {}

    def get(self, *shape: int) -> T:
        kept = self._kept.pop(shape, None)
        if kept is None:
            kept = self._make(*shape)
            if len(self._kept) >= self._limit:
                del self._kept[next(iter(self._kept))]
        self._kept[shape] = kept
        return kept


@functools.cache
def cuda_loads() -> str:
    """'' when ONNX Runtime's CUDA provider really loads here, else why not. Asked once per
    process: the onnxruntime-gpu wheel lists the provider even where libcudart or cuDNN is
    missing, and a session then falls back to CPU with a multi-line error of its own."""
    if CUDA not in ort.get_available_providers():
        return f"this ONNX Runtime ({ort.__version__}) has no CUDA provider"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA and cuDNN from the nvidia-* pip packages (ORT >= 1.21)
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the probe below tells
            log.debug("onnxruntime.preload_dlls: %s", exc)
    from rnnserve.models.slot_graphs import probe_model  # a one-node graph, no model needed

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the fallback's own error lines; ours says it once
    try:
        session = ort.InferenceSession(probe_model(), options, providers=[CUDA_EXACT, CPU])
    except Exception as exc:  # noqa: BLE001
        return f"the CUDA provider failed to start: {' '.join(str(exc).split())[:200]}"
    if CUDA not in session.get_providers():
        return (
            "the CUDA provider did not load (libcudart/cuDNN missing? install "
            "rnnserve[gpu] with CUDA 13 and cuDNN 9)"
        )
    return ""


def providers_for(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """--device: cuda must load or the server does not start; auto uses it when it loads."""
    if device == "cpu":
        return [CPU]
    why = cuda_loads()
    if not why:
        return [CUDA_EXACT, CPU]
    if device == "cuda":
        raise RuntimeError(f"--device cuda: {why}")
    if CUDA in ort.get_available_providers():  # a GPU build that cannot use the GPU
        _say_once(f"--device auto runs on CPU: {why}")
    return [CPU]


@functools.cache
def _say_once(line: str) -> None:
    log.warning(line)


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """What every rnnserve session runs with."""
    options = ort.SessionOptions()
    # Tiny recurrent graphs: thread hand-offs cost more than they save, and the sequential
    # executor avoids the parallel executor's scheduling overhead.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps a large run's peak for the life of the process; without it a one-step
    # run costs the same, and memory goes back to the system after every run
    # (docs/benchmarks.md).
    options.enable_cpu_mem_arena = False
    # ONNX Runtime's own warnings are plain text on stderr; what an operator needs from them
    # (a node placed on CPU) rnnserve logs itself, as JSON like every other line.
    options.log_severity_level = 3
    return options


NO_CUDA_KERNEL = {"RNN"}
"""Recurrent ops ONNX Runtime's CUDA provider has no kernel for (1.31): they run on the CPU,
with copies around them, inside a CUDA session."""


def _ops_off_gpu(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node} & NO_CUDA_KERNEL)


class OrtRunner:
    def __init__(self, spec: ModelSpec, directory: Path, device: str, intra_op_threads: int):
        self.spec = spec
        self.session = ort.InferenceSession(
            str(directory / MODEL_FILE),
            session_options(intra_op_threads),
            providers=providers_for(device),
        )
        self.provider = self.session.get_providers()[0]
        self.device_type = "cuda" if self.provider == CUDA else "cpu"
        """Where the provider keeps tensors: OrtValues for device-resident state go there."""
        if self.provider == CUDA and (slow := _ops_off_gpu(directory / MODEL_FILE)):
            log.warning(
                "%s v%d: ONNX Runtime has no CUDA kernel for %s; those nodes run on "
                "the CPU, with copies to and from the GPU around them",
                spec.name,
                spec.version,
                ", ".join(slow),
            )
        self.state_inputs = [s.input for s in spec.states]
        self.outputs = [OUTPUT_NAME, *(s.output for s in spec.states)]
        self._bound = ShapeCache(self.bind)

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {INPUT_NAME: x, **dict(zip(self.state_inputs, states))}
        y, *finals = self.session.run(self.outputs, feeds)
        return y, finals

    def buffers(self, rows: int, steps: int) -> Buffers | None:
        """Bound buffers for a [rows, steps] run, or None over BOUND_MAX_STEPS (large runs
        allocate; their run time dwarfs it). Event-loop runs only: one run uses them at a time."""
        if rows * steps > BOUND_MAX_STEPS:
            return None
        return self._bound.get(rows, steps)

    def bind(self, rows: int, steps: int) -> Buffers:
        """New buffers for [rows, steps] runs, owned by the caller."""
        spec = self.spec
        buffers = Buffers(
            self.session.io_binding(),
            np.zeros((rows, steps, spec.features), np.float32),
            [np.zeros((rows, s.size), np.float32) for s in spec.states],
            np.zeros((rows, steps, spec.outputs), np.float32),
            [np.zeros((rows, s.size), np.float32) for s in spec.states],
        )
        for name, array in ((INPUT_NAME, buffers.x), *zip(self.state_inputs, buffers.states)):
            bind_host(buffers.binding, name, array, self.device_type, buffers.uploads)
        for name, array in zip(self.outputs, (buffers.y, *buffers.finals)):
            buffers.binding.bind_output(
                name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data
            )
        return buffers

    def run_bound(self, buffers: HostBuffers | Bound) -> None:
        """One run from buffers.x and .states into buffers.y and .finals: this runner's own
        `Buffers`, or `DeviceBuffers` bound to its session, with the state as OrtValues in the
        provider's memory."""
        bound: Bound = buffers  # type: ignore[assignment]  # its own (no cast: a call per run)
        for value, array in bound.uploads:
            value.update_inplace(array)
        self.session.run_with_iobinding(bound.binding)

    def signature(self) -> tuple[list[GraphTensor], list[GraphTensor]]:
        def tensors(args: list[ort.NodeArg]) -> list[GraphTensor]:
            return [GraphTensor(a.name, a.type, a.shape) for a in args]

        return tensors(self.session.get_inputs()), tensors(self.session.get_outputs())
