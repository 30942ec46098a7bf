"""Preallocated recurrent state per model version, and how it gets into and out of a step's run.

A session owns a slot (a row index into one [capacity, size] table per state tensor). A step
gathers its batch's rows into the run and commits the final states back, so no step allocates
per-session state. A slot's step count is kept here too and moves with its state in the same
commit: whatever happens to the caller (a cancelled call, a failed run), a session's `steps`
says whether its state advanced.

Two placements: `StateStore` keeps the tables in host numpy (what a CPU run wants);
`DeviceStateStore` (rnnserve.state.device_state) keeps them in the provider's memory, so a step on a
GPU moves only x in and y out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from rnnserve.errors import ResourceExhausted
from rnnserve.models.contract import ModelSpec
from rnnserve.models.runtime import Runner

SlotIndex = list[int] | np.ndarray
"""Slot numbers: a list, or an int array (a stream's kept group, indexed without a Python loop)."""
Stepped = tuple[np.ndarray, Any, bool]
"""A step run's y [rows, k, outputs], its final states in the store's own form (to commit),
and whether y lives in buffers the next run reuses."""


def fill(out: np.ndarray, xs: list[np.ndarray]) -> None:
    """A bound run's x from the rows of each caller, in order."""
    if len(xs) == 1:
        out[...] = xs[0]
    else:
        np.concatenate(xs, out=out)


class Slots(ABC):
    """The slots, step counts and last-use times of one model version; where the state lives
    is the subclass's business."""

    def __init__(self, spec: ModelSpec, capacity: int, runner: Runner) -> None:
        self.spec = spec
        self.capacity = capacity
        self.runner = runner
        self.steps = np.zeros(capacity, np.int64)
        self.used_at = np.zeros(capacity, np.float64)
        """Each slot's session's last call (Session.last_used)."""
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise ResourceExhausted(
                f"all {self.capacity} session slots of this model are in use; "
                "close idle sessions or raise --max-sessions"
            )
        slot = self._free.pop()
        self.zero(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        """Zero states, zero steps: a new or reset session."""
        self.write(slot, [np.zeros(s.size, np.float32) for s in self.spec.states])
        self.steps[slot] = 0

    def touch(self, slots: SlotIndex, now: float) -> list[int]:
        """These slots' sessions were used at `now` (what the idle sweep reads); each one's
        timesteps since it opened or was reset (what a step answers)."""
        if len(slots) == 1:  # plain indexes: fancy ones cost more for one session
            slot = slots[0]
            self.used_at[slot] = now
            return [int(self.steps[slot])]
        self.used_at[slots] = now
        return self.steps[slots].tolist()

    def _advance(self, slots: SlotIndex, steps: int) -> None:
        if len(slots) == 1:
            self.steps[slots[0]] += steps
        else:
            self.steps[slots] += steps

    @abstractmethod
    def write(self, slot: int, states: list[np.ndarray]) -> None:
        """Set one slot's states (each [size] or [1, size]) from host arrays."""

    @abstractmethod
    def read(self, slot: int) -> list[np.ndarray]:
        """A host copy of one slot's states, [size] each."""

    @abstractmethod
    def step(self, xs: list[np.ndarray], slots: SlotIndex, inline: bool) -> Stepped:
        """One run of the rows xs (joined in order, [rows_i, k, features] each) from the
        slots' states; nothing is written back until `commit`. `inline` runs (on the event
        loop, one at a time) may use buffers kept per shape."""

    @abstractmethod
    def commit(self, slots: SlotIndex, finals: Any, steps: int) -> None:
        """The run's final states into its slots, `steps` timesteps on."""

    @abstractmethod
    def commit_rows(self, slots: SlotIndex, finals: Any, start: int, steps: int) -> None:
        """Only rows start … start + len(slots) of the run (the others' callers left)."""


class StateStore(Slots):
    """Host-resident state: numpy tables, gathered into the run's bound buffers."""

    def __init__(self, spec: ModelSpec, capacity: int, runner: Runner) -> None:
        super().__init__(spec, capacity, runner)
        self.arrays = [np.zeros((capacity, s.size), np.float32) for s in spec.states]

    def write(self, slot: int, states: list[np.ndarray]) -> None:
        for array, state in zip(self.arrays, states):
            array[slot] = np.reshape(state, -1)

    def read(self, slot: int) -> list[np.ndarray]:
        return [array[slot].copy() for array in self.arrays]

    def gather(self, slots: SlotIndex) -> list[np.ndarray]:
        """The slots' rows: a view for one slot (the streaming case; plain slicing is far
        cheaper than fancy indexing in a busy server), a copy for several."""
        if len(slots) == 1:
            return [array[slots[0] : slots[0] + 1] for array in self.arrays]
        return [array[slots] for array in self.arrays]

    def step(self, xs: list[np.ndarray], slots: SlotIndex, inline: bool) -> Stepped:
        k = xs[0].shape[1]
        bound = self.runner.buffers(len(slots), k) if inline else None
        if bound is None:
            x = xs[0] if len(xs) == 1 else np.concatenate(xs)
            y, finals = self.runner.run(x, self.gather(slots))
            return y, finals, False
        fill(bound.x, xs)
        for array, state in zip(self.arrays, bound.states):
            if len(slots) == 1:
                state[0] = array[slots[0]]
            else:
                np.take(array, slots, axis=0, out=state)
        self.runner.run_bound(bound)
        return bound.y, bound.finals, True

    def commit(self, slots: SlotIndex, finals: list[np.ndarray], steps: int) -> None:
        if len(slots) == 1:
            for array, state in zip(self.arrays, finals):
                array[slots[0]] = state[0]
        else:
            for array, state in zip(self.arrays, finals):
                array[slots] = state
        self._advance(slots, steps)

    def commit_rows(
        self, slots: SlotIndex, finals: list[np.ndarray], start: int, steps: int
    ) -> None:
        self.commit(slots, [f[start : start + len(slots)] for f in finals], steps)
