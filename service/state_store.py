"""Preallocated recurrent state per model version: one [capacity, size] array per state tensor.

A session owns a slot (a row index). Steps gather the rows of a batch into the ORT feed and
scatter the final states back, so no step allocates per-session arrays. A slot's step count is
kept here too and moves with its state in the same scatter: whatever happens to the caller (a
cancelled call, a failed run), a session's `steps` says whether its state advanced.
"""

from __future__ import annotations

import numpy as np

from rnnserve.contract import ModelSpec
from rnnserve.errors import ResourceExhausted


class StateStore:
    def __init__(self, spec: ModelSpec, capacity: int) -> None:
        self.capacity = capacity
        self.arrays = [np.zeros((capacity, s.size), np.float32) for s in spec.states]
        self.steps = np.zeros(capacity, np.int64)
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise ResourceExhausted(f"all {self.capacity} session slots of this model are in use; "
                                    "close idle sessions or raise --max-sessions")
        slot = self._free.pop()
        self.zero(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        """Zero states, zero steps: a new or reset session."""
        for array in self.arrays:
            array[slot] = 0.0
        self.steps[slot] = 0

    def write(self, slot: int, states: list[np.ndarray]) -> None:
        for array, state in zip(self.arrays, states):
            array[slot] = state

    def read(self, slot: int) -> list[np.ndarray]:
        return [array[slot].copy() for array in self.arrays]

    def gather(self, slots: list[int]) -> list[np.ndarray]:
        """The slots' rows: a view for one slot (the streaming case; plain slicing is far
        cheaper than fancy indexing in a busy server), a copy for several."""
        if len(slots) == 1:
            return [array[slots[0]:slots[0] + 1] for array in self.arrays]
        return [array[slots] for array in self.arrays]

    def scatter(self, slots: list[int], states: list[np.ndarray], steps: int) -> None:
        """The slots' new states, `steps` timesteps on from the last."""
        if len(slots) == 1:
            for array, state in zip(self.arrays, states):
                array[slots[0]] = state[0]
            self.steps[slots[0]] += steps
            return
        for array, state in zip(self.arrays, states):
            array[slots] = state
        self.steps[slots] += steps
