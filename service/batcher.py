"""Dynamic batcher: concurrent steps and predictions for one model version, coalesced into one
ONNX Runtime run per group of equal timestep count.

Each work item keeps its own future, cancelled items are dropped before a batch forms, and a
failing run fails only the items in it.

Small runs happen on the event loop itself, large ones in executor threads. Measured on 2 cores:
handing an echo step to a thread and back costs ~80-120 µs of CPU, the ORT run ~7 µs, so for
runs up to --inline-steps timesteps (rows × steps) the hand-off costs more than the loop would
ever wait; a 16k-sequence Predict still runs off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import Unavailable
from service.metrics import Metrics
from service.runner import Runner
from service.state_store import StateStore

log = logging.getLogger(__name__)

Result = tuple[np.ndarray, list[np.ndarray]]


@dataclass(eq=False)
class Work:
    """Rows of x [rows, k, features] with their states: in the store (slots) or given (states)."""

    x: np.ndarray
    future: asyncio.Future
    slots: np.ndarray | None = None
    states: list[np.ndarray] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class Batcher:
    def __init__(self, runner: Runner, store: StateStore, metrics: Metrics, labels: tuple[str, str],
                 executor: Executor, run_slots: asyncio.Semaphore, max_batch_size: int,
                 max_batch_delay_s: float, inline_steps: int) -> None:
        self.runner = runner
        self.store = store
        self.executor = executor
        self.run_slots = run_slots
        self.max_batch_size = max_batch_size
        self.max_delay = max_batch_delay_s
        self.inline_steps = inline_steps
        self._pending: deque[Work] = deque()
        self._wakeup = asyncio.Event()
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._compute = metrics.compute.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._timesteps = metrics.timesteps.labels(*labels)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def step(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance the sessions in `slots` by x's timesteps; their states update in place."""
        y, _ = await self._submit(Work(x, asyncio.get_running_loop().create_future(), slots=slots))
        return y

    async def predict(self, x: np.ndarray, states: list[np.ndarray]) -> Result:
        return await self._submit(Work(x, asyncio.get_running_loop().create_future(),
                                       states=states))

    async def _submit(self, work: Work) -> Result:
        if self._task.done():
            raise Unavailable("this model version is unloading; retry on the latest version")
        self._pending.append(work)
        self._wakeup.set()
        try:
            return await asyncio.shield(work.future)
        except asyncio.CancelledError:
            if work.started:
                # The run may still write this work's state slots: keep the caller (and so the
                # session's lock) until it has, or a reused slot could be overwritten.
                await _outlast_cancellation(work.future)
            work.future.cancel()
            raise

    async def close(self) -> None:
        self._task.cancel()
        while self._pending:
            work = self._pending.popleft()
            if not work.future.done():
                work.future.set_exception(Unavailable("the model was unloaded"))

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_more()
            batch = self._take_batch()
            groups: dict[int, list[Work]] = {}
            for work in batch:
                groups.setdefault(work.x.shape[1], []).append(work)
            for group in groups.values():
                await self._run(group)

    async def _wait_for_more(self) -> None:
        """With --max-batch-delay, hold the first item until the batch fills or the delay ends."""
        if self.max_delay <= 0:
            return
        deadline = self._pending[0].enqueued + self.max_delay
        while sum(w.rows for w in self._pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[Work]:
        batch: list[Work] = []
        rows = 0
        while self._pending:
            work = self._pending[0]
            if work.future.done():  # cancelled by its caller while queued
                self._pending.popleft()
                continue
            if batch and rows + work.rows > self.max_batch_size:
                break
            work.started = True
            batch.append(self._pending.popleft())
            rows += work.rows
        return batch

    async def _run(self, group: list[Work]) -> None:
        started = time.monotonic()
        for work in group:
            self._queue_wait.observe(started - work.enqueued)
        rows = sum(w.rows for w in group)
        try:
            if rows * group[0].x.shape[1] <= self.inline_steps:
                results = self._run_sync(group)
            else:
                async with self.run_slots:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._run_sync, group)
        except Exception as exc:  # a failed run fails its own items, never the loop
            log.exception("batch run failed")
            for work in group:
                if not work.future.done():
                    work.future.set_exception(exc)
            return
        self._compute.observe(time.monotonic() - started)
        self._batch_size.observe(rows)
        self._timesteps.inc(rows * group[0].x.shape[1])
        for work, result in zip(group, results):
            if not work.future.done():
                work.future.set_result(result)

    def _run_sync(self, group: list[Work]) -> list[Result]:
        n_states = len(self.store.arrays)
        if len(group) == 1:
            x = group[0].x
            states = self._states_of(group[0])
        else:
            x = np.concatenate([w.x for w in group])
            parts = [self._states_of(w) for w in group]
            states = [np.concatenate([p[i] for p in parts]) for i in range(n_states)]
        y, finals = self.runner.run(x, states)
        results, start = [], 0
        for work in group:
            end = start + work.rows
            mine = [f[start:end] for f in finals]
            if work.slots is not None:
                self.store.scatter(work.slots, mine)
            results.append((y[start:end], mine))
            start = end
        return results

    def _states_of(self, work: Work) -> list[np.ndarray]:
        return self.store.gather(work.slots) if work.slots is not None else work.states


async def _outlast_cancellation(future: asyncio.Future) -> None:
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:  # the run failed; its error is the caller's no longer
            return
