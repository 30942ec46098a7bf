"""The memory budget: every request's work is costed before it runs and admitted against one
server-wide byte budget, so no request, and no mix of them, can take the process past its limit.

Why costs are estimated, not measured: ONNX Runtime gives no per-run peak, and a run's peak is
decided before it starts (the sequence is known). With the CPU arena off, one run's peak grows
linearly in rows x timesteps; measured per row-timestep (VmHWM, 8192x64 and 1024x512 runs):

    model       cell         peak bytes   estimate below
    echo        1x rnn(4)        36            80
    digits      1x rnn(16)      161           376
    forecast    1x gru(32)      540           660
    binary_add  2x lstm(20)     489           668

The estimate counts x and its transpose, each layer's output sequence twice, the widest layer's
gate pre-activations and the head's three tensors, so it errs high for every cell kind.

That formula knows only what model.json says. An imported graph can hold more between the
recurrence and y (a small RNN under a wide hidden Dense layer peaked at hundreds of times its
costed bytes: tests/test_import.py), so the graph itself is costed too: ONNX shape inference sizes
each tensor, and every tensor that scales with x's batch and time dimensions adds its bytes.
A run's cost is the larger of the two.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
from collections import deque
from dataclasses import dataclass

import onnx

from rnnserve.errors import ResourceExhausted
from rnnserve.models.contract import INPUT_NAME, ModelSpec

FLOAT = 4
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
CHUNK_SHARE = 4
"""A Predict's rows run in chunks of at most budget / CHUNK_SHARE, so several large requests
progress side by side and small ones are never queued behind one giant run."""
MESSAGE_COPIES = 3
"""A response exists as the numpy result, its bytes and the serialized message at once; a request
as gRPC's buffer, the parsed message and its bytes field."""


@dataclass(frozen=True)
class RunCost:
    """What one model's runs cost in bytes: per row-timestep and per row (the state tensors)."""

    per_step: int
    per_row: int

    @classmethod
    def of(cls, spec: ModelSpec, graph: onnx.ModelProto | None = None) -> RunCost:
        layer_units = spec.units * spec.layers
        widest_gates = GATES.get(spec.cell, 4) * spec.units
        per_step = FLOAT * (2 * spec.features + 2 * layer_units + widest_gates + 3 * spec.outputs)
        per_row = FLOAT * 3 * sum(s.size for s in spec.states)
        if graph is not None:
            tensors_step, tensors_row = graph_tensor_bytes(graph, INPUT_NAME)
            per_step, per_row = max(per_step, tensors_step), max(per_row, tensors_row)
        return cls(per_step, per_row)

    def run(self, rows: int, steps: int) -> int:
        return rows * (steps * self.per_step + self.per_row)


def graph_tensor_bytes(model: onnx.ModelProto, x_name: str) -> tuple[int, int]:
    """Bytes per row-timestep and per row of the graph's tensors whose shapes contain x's
    batch dimension (and its time dimension, for the first): the tensors a run's size scales.
    Tensors shape inference cannot size (or sized by other unknowns) are not counted."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    x = next((v for v in graph.input if v.name == x_name), None)
    if x is None or len(x.type.tensor_type.shape.dim) < 2:
        return 0, 0
    batch, time = (d.dim_param for d in x.type.tensor_type.shape.dim[:2])
    if not (batch and time):
        return 0, 0
    per_step = per_row = 0
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        rest = [d for d in dims if d not in (batch, time)]
        if batch not in dims or not all(isinstance(d, int) and d > 0 for d in rest):
            continue
        nbytes = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize * math.prod(rest)
        if time in dims:
            per_step += nbytes
        else:
            per_row += nbytes
    return per_step, per_row


class MemoryBudget:
    """An async byte semaphore, first come first served: a large reservation is not starved by
    a stream of small ones, one that could never fit is refused at once, and the queue itself is
    bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.queued = 0
        """Bytes the waiting reservations ask for: at most one budget's worth may wait, as a
        waiting request already holds its input; past that a newcomer is told to retry."""
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def chunk(self) -> int:
        """The most one run of a split request may cost."""
        return self.capacity // CHUNK_SHARE

    def check(self, nbytes: int, what: str, advice: str) -> None:
        if nbytes > self.capacity:
            raise ResourceExhausted(
                f"{what} needs about {_mib(nbytes)} of working memory; this server's budget is "
                f"{_mib(self.capacity)} (--memory-budget): {advice}"
            )

    def check_run(self, nbytes: int, what: str, advice: str) -> None:
        if nbytes > self.chunk:
            raise ResourceExhausted(
                f"{what} needs about {_mib(nbytes)} of working memory in one run; this server "
                f"allows {_mib(self.chunk)} per run (1/{CHUNK_SHARE} of --memory-budget): {advice}"
            )

    def reserve(self, nbytes: int, what: str, advice: str) -> Reservation:
        """`async with budget.reserve(n, ...)`: held until the block ends; refused up front if
        n could never fit, naming `what` and the `advice` that would make it fit."""
        self.check(nbytes, what, advice)
        return Reservation(self, nbytes)

    async def _acquire(self, nbytes: int) -> None:
        if self.hold(nbytes):
            return
        if self.queued + nbytes > self.capacity:
            raise ResourceExhausted(
                f"the memory budget ({_mib(self.capacity)}) is taken by other requests and "
                f"{_mib(self.queued)} more wait for it; retry with backoff",
                retry_after=0.1,
            )
        future = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        self.queued += nbytes
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(nbytes)  # granted just as the caller gave up
            elif entry in self._waiters:  # not already passed over by _wake
                self._waiters.remove(entry)
                self.queued -= nbytes
                self._wake()
            raise

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` would be granted now, ahead of no waiting request. Work that is
        done before the event loop runs anything else needs only this check: nothing can ask
        for memory meanwhile, so taking and giving back the bytes would change nothing."""
        return not self._waiters and self.used + nbytes <= self.capacity

    def hold(self, nbytes: int) -> bool:
        """Take `nbytes` now, for something kept between requests (given back with `release`),
        if they fit with no request waiting; else take nothing. What is only worth keeping
        while memory is plentiful asks this way, and never makes a request wait."""
        if not self.fits(nbytes):
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            nbytes, future = self._waiters.popleft()
            self.queued -= nbytes
            if future.done():
                continue
            self.used += nbytes
            future.set_result(None)


class Reservation:
    """A class, not a generator-based context manager: it sits on every streamed step."""

    __slots__ = ("budget", "nbytes")

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes

    async def __aenter__(self) -> None:
        await self.budget._acquire(self.nbytes)

    async def __aexit__(self, *exc: object) -> None:
        self.budget.release(self.nbytes)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:,.0f} KiB"


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    request-sized arrays come from the heap and stay in the process, several times what the
    thresholds set here leave. Pinning the mmap one also pins the heap's trim threshold at
    128 KiB, and trimming the heap top after nearly every message made a lone stream's steps
    markedly dearer; blocks over 128 KiB are mapped on their own anyway, so the heap may keep up
    to 32 MiB of free top (figures: docs/benchmarks.md). A no-op (False) where the C library is
    not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
