"""Session state resident in the provider's memory (`--session-state device`; the default on
CUDA): a step moves only x in and y out.

The state tables are ONNX Runtime OrtValues on the model's device. A step runs three bound
graphs on that provider: gather (the batch's slot rows into the model's state inputs), the
model, and, once its callers are known to still wait, scatter (the final states into their
rows, in place; rnnserve.models.slot_graphs). Snapshots (GetState, handoff, moves) and restores copy
one slot to or from the host only when asked. On the CPU provider the same code runs on CPU
OrtValues, which is how CI holds it bit-equal to the host store without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from rnnserve.models import slot_graphs as graphs
from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME, ModelSpec
from rnnserve.models.runner import (
    BOUND_MAX_STEPS,
    OrtRunner,
    ShapeCache,
    bind_uploaded,
    session_options,
)
from rnnserve.state.state_store import SlotIndex, Slots, Stepped, fill


@dataclass(eq=False)
class DeviceBuffers:
    """One run shape's host x and y, its device-side state rows, and the three bindings that
    connect them to the tables. `runner.run_bound` runs `binding`, the model's."""

    binding: ort.IOBinding
    gather: ort.IOBinding
    scatter: ort.IOBinding
    x: np.ndarray
    y: np.ndarray
    slots: np.ndarray
    """int64 [rows, 1], copied to `slots_value` (which gather and scatter read) before a run."""
    slots_value: ort.OrtValue
    states: list[ort.OrtValue]
    finals: list[ort.OrtValue]
    uploads: list[tuple[ort.OrtValue, np.ndarray]]
    """x's device value: OrtRunner.run_bound refreshes it."""


class DeviceStateStore(Slots):
    def __init__(self, spec: ModelSpec, capacity: int, runner: OrtRunner) -> None:
        super().__init__(spec, capacity, runner)
        self.ort = runner
        """The runner as ONNX Runtime's: the model's bindings are made on its session."""
        self.device = runner.device_type
        self.sizes = tuple(s.size for s in spec.states)
        self.tables = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((capacity, n), np.float32), self.device, 0)
            for n in self.sizes
        ]
        providers = runner.session.get_providers()
        self._gather = ort.InferenceSession(
            graphs.gather_model(self.sizes), session_options(), providers=providers
        )
        self._scatter = ort.InferenceSession(
            graphs.scatter_model(self.sizes), session_options(), providers=providers
        )
        self._bound = ShapeCache(self._bind)

    def _values(self, rows: int) -> list[ort.OrtValue]:
        return [self._value((rows, n), np.float32) for n in self.sizes]

    def _bind(self, rows: int, steps: int) -> DeviceBuffers:
        """x and slots go to the device through values of their own, even on CPU, so CI runs
        the very path a GPU does (bind_host)."""
        spec, runner = self.spec, self.ort
        slots = np.zeros((rows, 1), np.int64)
        b = DeviceBuffers(
            runner.session.io_binding(),
            self._gather.io_binding(),
            self._scatter.io_binding(),
            np.zeros((rows, steps, spec.features), np.float32),
            np.zeros((rows, steps, spec.outputs), np.float32),
            slots,
            self._value(slots.shape, np.int64),
            self._values(rows),
            self._values(rows),
            [],
        )
        bind_uploaded(b.binding, INPUT_NAME, b.x, self.device, b.uploads)
        b.binding.bind_output(OUTPUT_NAME, "cpu", 0, np.float32, list(b.y.shape), b.y.ctypes.data)
        for name, value in zip(runner.state_inputs, b.states):
            b.binding.bind_ortvalue_input(name, value)
        for name, value in zip(runner.outputs[1:], b.finals):
            b.binding.bind_ortvalue_output(name, value)
        b.gather.bind_ortvalue_input(graphs.SLOTS, b.slots_value)
        b.scatter.bind_ortvalue_input(graphs.SLOTS, b.slots_value)
        for i, (table, state, final) in enumerate(zip(self.tables, b.states, b.finals)):
            b.gather.bind_ortvalue_input(graphs.table(i), table)
            b.gather.bind_ortvalue_output(graphs.rows(i), state)
            self._bind_tables(b.scatter, i, table)
            b.scatter.bind_ortvalue_input(graphs.update(i), final)
        return b

    def _value(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)

    @staticmethod
    def _bind_tables(binding: ort.IOBinding, i: int, table: ort.OrtValue) -> None:
        """The table as scatter's input and, the same buffer, its output: updated in place."""
        binding.bind_ortvalue_input(graphs.table(i), table)
        binding.bind_ortvalue_output(graphs.updated(i), table)

    def step(self, xs: list[np.ndarray], slots: SlotIndex, inline: bool) -> Stepped:
        rows, k = len(slots), xs[0].shape[1]
        b = (
            self._bound.get(rows, k)
            if inline and rows * k <= BOUND_MAX_STEPS
            else self._bind(rows, k)
        )
        fill(b.x, xs)
        b.slots[:, 0] = slots
        b.slots_value.update_inplace(b.slots)
        self._gather.run_with_iobinding(b.gather)
        self.ort.run_bound(b)
        return b.y, b, inline

    def commit(self, slots: SlotIndex, finals: DeviceBuffers, steps: int) -> None:
        self._scatter.run_with_iobinding(finals.scatter)  # finals.slots holds `slots`
        self._advance(slots, steps)

    def commit_rows(self, slots: SlotIndex, finals: DeviceBuffers, start: int, steps: int) -> None:
        """Rare (callers cancelled while their run was in a thread): through the host."""
        end = start + len(slots)
        self._put(slots, [value.numpy()[start:end] for value in finals.finals])
        self._advance(slots, steps)

    def write(self, slot: int, states: list[np.ndarray]) -> None:
        self._put([slot], [np.reshape(state, (1, -1)) for state in states])

    def _put(self, slots: SlotIndex, rows: list[np.ndarray]) -> None:
        """Host rows into the slots' rows of the tables."""
        binding = self._scatter.io_binding()
        index = np.asarray(slots, np.int64).reshape(-1, 1)
        values = [np.ascontiguousarray(r, np.float32) for r in rows]  # alive through the run
        binding.bind_cpu_input(graphs.SLOTS, index)
        for i, (table, value) in enumerate(zip(self.tables, values)):
            self._bind_tables(binding, i, table)
            binding.bind_cpu_input(graphs.update(i), value)
        self._scatter.run_with_iobinding(binding)

    def read(self, slot: int) -> list[np.ndarray]:
        binding = self._gather.io_binding()
        index = np.asarray([[slot]], np.int64)  # alive through the run
        binding.bind_cpu_input(graphs.SLOTS, index)
        for i, table in enumerate(self.tables):
            binding.bind_ortvalue_input(graphs.table(i), table)
            binding.bind_output(graphs.rows(i), "cpu")
        self._gather.run_with_iobinding(binding)
        return [rows[0] for rows in binding.copy_outputs_to_cpu()]
