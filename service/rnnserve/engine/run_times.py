"""How long a model's runs take, as measured, so the batcher can tell which runs are short
enough for the event loop.

A run's time is not proportional to its size: a one-row run of a small model is mostly fixed
cost (docs/benchmarks.md has echo's times by size), so a single per-step rate learnt
from small runs would overrate large ones and the other way round. Runs are kept apart by size
class (powers of two of rows x timesteps), each with its own average. A size not yet seen is
rated at the rate of the largest smaller class seen, which can only overrate it (fixed costs
spread thinner as runs grow), so the error goes towards the thread pool, never towards a long
stall of the loop.
"""

from __future__ import annotations

import time

import numpy as np

from rnnserve.models.runtime import Runner

SMOOTHING = 0.2
"""Weight of the newest run in its class's average: a few runs settle it, one outlier does not."""


class RunTimes:
    def __init__(self) -> None:
        self._per_step: dict[int, float] = {}
        """Size class -> average seconds per (row x timestep) of its runs."""

    def expect(self, steps: int) -> float | None:
        """Seconds a run of `steps` rows x timesteps should take; None when no run as small
        or smaller has been measured yet."""
        size = steps.bit_length()
        rate = self._per_step.get(size)
        if rate is None:
            smaller = [s for s in self._per_step if s < size]
            if not smaller:
                return None
            rate = self._per_step[max(smaller)]
        return rate * steps

    def measured(self, steps: int, seconds: float) -> None:
        size = steps.bit_length()
        rate = seconds / steps
        old = self._per_step.get(size)
        self._per_step[size] = rate if old is None else old + SMOOTHING * (rate - old)


def timed_at_load(runner: Runner) -> RunTimes:
    """Run times seeded with a one-step, one-row run (the lone stream's), timed at load after
    the warm-up runs, so a fresh model's first steps need not go to a thread to be measured."""
    spec = runner.spec
    x = np.zeros((1, 1, spec.features), np.float32)
    states = [np.zeros((1, s.size), np.float32) for s in spec.states]
    times = RunTimes()
    started = time.perf_counter()
    runner.run(x, states)
    times.measured(1, time.perf_counter() - started)
    return times
