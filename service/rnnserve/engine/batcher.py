"""Dynamic batcher: concurrent steps and predictions for one model version, coalesced into one
ONNX Runtime run per group of equal timestep count.

One entry, `submit`, decides where work runs: at once on the event loop when it is alone, else
queued for the next flush, which runs each group on the loop or in an executor thread. Every
run, wherever it ran, ends in `_finish`, on the loop: commit, answer, record its timing.

Work queued while the event loop handles a burst of messages is flushed by one callback that
runs after them, so every step that arrived in the same loop iteration shares a run; no task
switch or event sits between a step and its run. While a run is in an executor thread, new work
queues and forms the next batch when the run ends.

Short runs happen on the event loop itself, long ones in executor threads: handing a run to a
thread and back costs more CPU than a small model's run itself, so a run expected to take at
most --inline-run-us (from this model's measured runs, see run_times) runs on the loop, where
the hand-off would cost more than the loop's wait is worth; a large Predict still runs off the
loop. The measurements: docs/benchmarks.md, "Measurements behind the design".

Each work item keeps its own future, cancelled items are dropped before a batch forms, and a
failing run fails only the items in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from rnnserve.engine.run_times import RunTimes
from rnnserve.errors import Unavailable
from rnnserve.models.runtime import Runner
from rnnserve.ops.metrics import Metrics
from rnnserve.state.state_store import SlotIndex, Slots

log = logging.getLogger(__name__)

Result = tuple[np.ndarray, list[np.ndarray]]


@dataclass(eq=False)
class Ran:
    """A group's run: each work's result, and for steps the final states still to commit."""

    results: list[Result]
    slots: SlotIndex | None = None
    finals: object = None
    seconds: float = 0.0
    """How long the run took where it ran; recorded into run_times on the event loop, the one
    thread that reads them."""


@dataclass(eq=False)
class Work:
    """Rows of x [rows, k, features] with their states: in the store (slots) or given (states)."""

    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    slots: SlotIndex | None = None
    states: list[np.ndarray] | None = None
    run: asyncio.Future | None = field(default=None, repr=False)
    """Set while the work's batch runs in a thread, which may still write its state slots."""
    trace: Any = field(default=None, repr=False)
    """Its caller's trace context, with tracing on: its queue and run spans go there."""

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    async def outcome(self) -> Result:
        """The queued work's result, once its batch has run."""
        try:
            return cast(Result, await self.future)
        except asyncio.CancelledError:
            if self.run is not None:
                # The thread may still write this work's state slots: keep the caller (and so
                # the session's lock) until it has, or a reused slot could be overwritten.
                await _outlast_cancellation(self.run)
            raise


class Batcher:
    def __init__(
        self,
        runner: Runner,
        store: Slots,
        metrics: Metrics,
        labels: tuple[str, str],
        executor: Executor,
        run_slots: asyncio.Semaphore,
        max_batch_size: int,
        max_batch_delay_s: float,
        inline_run_s: float,
        run_times: RunTimes,
    ) -> None:
        self.runner = runner
        self.store = store
        self.executor = executor
        self.run_slots = run_slots
        self.max_batch_size = max_batch_size
        self.max_delay = max_batch_delay_s
        self.inline_run_s = inline_run_s
        self.run_times = run_times
        self._loop = asyncio.get_running_loop()
        self._pending: deque[Work] = deque()
        self._pending_rows = 0
        self._flush_at: asyncio.Handle | None = None
        self._flush_soon = False
        self._threaded: asyncio.Task | None = None
        self._closed = False
        self._queue_wait = metrics.queue_wait.labels(*labels)
        self._compute = metrics.compute.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._timesteps = metrics.timesteps.labels(*labels)
        self._labels = labels
        self._tracing = metrics.tracing

    def submit(
        self,
        x: np.ndarray,
        slots: SlotIndex | None = None,
        states: list[np.ndarray] | None = None,
        only_now: bool = False,
    ) -> Result | Work | None:
        """The one way in: a step of the sessions in `slots` (their states update in place), or
        a prediction from the given `states`. It runs at once on the event loop when `_alone`
        allows, and its result comes back directly (a failed run raises, its sessions as they
        were); otherwise it is queued, and the `Work` comes back for its caller to await
        (`Work.outcome`): the flush runs it on the loop or in a thread. `only_now`: None
        instead of queueing, for a caller that cannot wait (`StepPipeline.now`)."""
        if self._closed:
            raise Unavailable(
                "this model version is unloading; retry on the latest version", retry_after=0.0
            )
        alone = self._alone(x.shape[0] * x.shape[1])
        if only_now and not alone:
            return None
        work = Work(x, self._loop.create_future(), self._loop.time(), slots=slots, states=states)
        if self._tracing.on:
            work.trace = self._tracing.context()
        if alone:
            self._run_inline([work])
            return work.future.result()
        self._pending.append(work)
        self._pending_rows += work.rows
        self._schedule()
        return work

    async def run(
        self,
        x: np.ndarray,
        slots: SlotIndex | None = None,
        states: list[np.ndarray] | None = None,
    ) -> Result:
        """`submit`, its result awaited: for callers with nothing to do meanwhile."""
        done = self.submit(x, slots, states)
        if isinstance(done, Work):
            return await done.outcome()
        assert done is not None  # None only for only_now
        return done

    def _alone(self, steps: int) -> bool:
        """Whether work of `steps` rows x timesteps can run now, without waiting a loop turn
        for company: nothing else is queued, scheduled or running, no delay was asked for, it
        is small enough for the event loop, and the loop has no other callback ready this turn
        (which might bring work to batch with). A lone stream then skips the flush callback
        and the wake-up of its caller, which is most of its server CPU per step beside the run
        (docs/benchmarks.md). CPython's event loop exposes its ready queue only as `_ready`;
        on another loop this never says yes, and every step takes the queue."""
        ready = getattr(self._loop, "_ready", None)
        return (
            ready is not None
            and not ready
            and not self._pending
            and self._flush_at is None
            and self._threaded is None
            and self.max_delay <= 0
            and self._short(steps)
        )

    def _schedule(self) -> None:
        """Arrange one flush: after the current burst, or when --max-batch-delay ends."""
        if self._threaded is not None or not self._pending:
            return
        due = self.max_delay <= 0 or self._pending_rows >= self.max_batch_size
        if self._flush_at is not None:
            if self._flush_soon or not due:
                return
            self._flush_at.cancel()  # the batch filled before its delay ended
        self._flush_soon = due
        self._flush_at = (
            self._loop.call_soon(self._flush)
            if due
            else self._loop.call_at(self._pending[0].enqueued + self.max_delay, self._flush)
        )

    async def close(self) -> None:
        """Fail queued work; a batch already running finishes and answers its callers."""
        self._closed = True
        if self._flush_at is not None:
            self._flush_at.cancel()
        while self._pending:
            work = self._pending.popleft()
            if not work.future.done():
                work.future.set_exception(Unavailable("the model was unloaded"))

    def _flush(self) -> None:
        self._flush_at = None
        while self._pending:
            batch = self._take_batch()
            try:
                groups: dict[tuple[int, bool], list[Work]] = {}
                for work in batch:  # steps and predictions of equal length apart
                    groups.setdefault((work.x.shape[1], work.slots is None), []).append(work)
                if any(self._threads(group) for group in groups.values()):
                    self._threaded = self._loop.create_task(self._run_groups(list(groups.values())))
                    return
                for group in groups.values():
                    self._run_inline(group)
            except Exception as exc:  # out of the queue: its callers must hear of it
                self._fail(batch, exc)

    def _take_batch(self) -> list[Work]:
        batch: list[Work] = []
        rows = 0
        while self._pending:
            work = self._pending[0]
            if batch and rows + work.rows > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= work.rows
            if work.future.done():  # cancelled by its caller while queued
                continue
            batch.append(work)
            rows += work.rows
        return batch

    def _threads(self, group: list[Work]) -> bool:
        return not self._short(sum(w.rows for w in group) * group[0].x.shape[1])

    def _short(self, steps: int) -> bool:
        """Whether a run of `steps` rows x timesteps is expected within --inline-run-us; a size
        never measured, nor any smaller one, is not."""
        expected = self.run_times.expect(steps)
        return expected is not None and expected <= self.inline_run_s

    def _run_inline(self, group: list[Work]) -> None:
        """The group run here and now; its callers are all waiting (a flush has just dropped
        the cancelled ones, and `submit` made its work this turn)."""
        started = self._loop.time()
        try:
            ran = self._run_sync(group, inline=True)
        except Exception as exc:  # a failed run fails its own items, never the batcher
            self._fail(group, exc)
            return
        self._finish(group, ran, started)

    async def _run_groups(self, groups: list[list[Work]]) -> None:
        """A batch with a large group: that group runs in a thread while new work queues."""
        try:
            for group in groups:
                if self._threads(group):
                    async with self.run_slots:
                        await self._run_in_thread(group)
                else:
                    group = _live(group)  # the thread's run took time: some may have left
                    if group:
                        self._run_inline(group)
        finally:
            self._threaded = None
            if not self._closed:
                self._schedule()

    async def _run_in_thread(self, group: list[Work]) -> None:
        # No await from here to setting work.run: a caller cancelled before it is dropped, one
        # cancelled after it waits for the thread.
        group = _live(group)
        if not group:
            return
        started = self._loop.time()
        run = self._loop.run_in_executor(self.executor, self._run_sync, group)
        for work in group:
            work.run = run
        try:
            ran = await run
        except Exception as exc:
            self._fail(group, exc)
            return
        self._finish(group, ran, started)

    @staticmethod
    def _fail(group: list[Work], exc: Exception) -> None:
        log.error("batch run failed", exc_info=exc)
        for work in group:
            if not work.future.done():
                work.future.set_exception(exc)

    def _finish(self, group: list[Work], ran: Ran, started: float) -> None:
        """Answer the callers still waiting. A step's final states reach its slots here, on the
        event loop, only if its caller still waits: a caller cancelled while the run was in a
        thread leaves its session exactly as it was (state and step count)."""
        k = group[0].x.shape[1]
        if ran.slots is not None:
            try:
                for work in group:
                    if work.future.done():
                        self._commit_waiting(group, ran, k)
                        break
                else:  # every caller waits: one commit
                    self.store.commit(ran.slots, ran.finals, k)
            except Exception as exc:  # the state stays as it was; so does the step count
                self._fail(group, exc)
                return
        for work, result in zip(group, ran.results):
            if not work.future.done():
                work.future.set_result(result)
        self._observe(group, started, ran)

    def _observe(self, group: list[Work], started: float, ran: Ran) -> None:
        rows = 0
        for work in group:
            self._queue_wait.observe(started - work.enqueued)
            rows += work.x.shape[0]
        steps = rows * group[0].x.shape[1]
        self.run_times.measured(steps, ran.seconds)
        self._compute.observe(self._loop.time() - started)
        self._batch_size.observe(rows)
        self._timesteps.inc(steps)
        if self._tracing.on:
            self._traced(group, started, rows)

    def _traced(self, group: list[Work], started: float, rows: int) -> None:
        """Each traced work's wait in the queue and its share of the run (the whole run's
        times, with the batch it ran in)."""
        now = self._loop.time()
        run = {
            "rnnserve.model": self._labels[0],
            "rnnserve.version": self._labels[1],
            "rnnserve.batch_rows": rows,
            "rnnserve.timesteps": group[0].x.shape[1],
            "rnnserve.thread": group[0].run is not None,
        }
        for work in group:
            if work.trace is not None:
                self._tracing.record("batch queue", work.trace, work.enqueued, started, {}, now)
                self._tracing.record("model run", work.trace, started, now, run, now)

    def _commit_waiting(self, group: list[Work], ran: Ran, k: int) -> None:
        """The rows of the callers still waiting, when some have left."""
        start = 0
        for work in group:
            if not work.future.done():
                self.store.commit_rows(cast(SlotIndex, work.slots), ran.finals, start, k)
            start += work.rows

    def _run_sync(self, group: list[Work], inline: bool = False) -> Ran:
        """One run for the group (all steps or all predictions), timed for `run_times`: what
        the event loop would wait for it, hand-off to a thread not included."""
        started = time.perf_counter()
        ran = self._run(group, inline)
        ran.seconds = time.perf_counter() - started
        return ran

    def _run(self, group: list[Work], inline: bool) -> Ran:
        """On the event loop (`inline`) through reused bound buffers."""
        if group[0].slots is not None:
            slots = (
                group[0].slots
                if len(group) == 1
                else [s for w in group for s in cast(SlotIndex, w.slots)]
            )
            y, finals, reused = self.store.step([w.x for w in group], slots, inline)
            return Ran(self._split(group, y, [], reused), slots, finals)
        rows = sum(w.rows for w in group)
        bound = self.runner.buffers(rows, group[0].x.shape[1]) if inline else None
        if bound is None:
            y, finals = self.runner.run(*self._joined(group))
            return Ran(self._split(group, y, finals, reused=False))
        start = 0
        for work in group:
            end = start + work.rows
            bound.x[start:end] = work.x
            for i, state in enumerate(cast(list[np.ndarray], work.states)):
                bound.states[i][start:end] = state
            start = end
        self.runner.run_bound(bound)
        return Ran(self._split(group, bound.y, bound.finals, reused=True))

    @staticmethod
    def _joined(group: list[Work]) -> tuple[np.ndarray, list[np.ndarray]]:
        if len(group) == 1:
            return group[0].x, cast(list[np.ndarray], group[0].states)
        return (
            np.concatenate([w.x for w in group]),
            [
                np.concatenate(states)
                for states in zip(*(cast(list[np.ndarray], w.states) for w in group))
            ],
        )

    @staticmethod
    def _split(
        group: list[Work], y: np.ndarray, finals: list[np.ndarray], reused: bool
    ) -> list[Result]:
        """Each work's rows of y and of a prediction's final states (a step's stay with the
        store until committed). Rows of `reused` buffers are copied out: the next run
        overwrites them."""
        results, start = [], 0
        for work in group:
            end = start + work.rows
            mine = [f[start:end].copy() if reused else f[start:end] for f in finals]
            results.append((y[start:end].copy() if reused else y[start:end], mine))
            start = end
        return results


def _live(group: list[Work]) -> list[Work]:
    """The items whose callers still wait; those cancelled meanwhile must not touch state."""
    return [w for w in group if not w.future.done()]


async def _outlast_cancellation(run: asyncio.Future) -> None:
    while not run.done():
        try:
            await asyncio.shield(run)
        except asyncio.CancelledError:
            continue
        except Exception:  # the run failed; its error is the caller's no longer
            return
