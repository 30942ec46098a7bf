"""The one path of every session step, whichever door it came through: a native Step or
Stream message, or a v2 sequence request.

1. **Rows.** The message's rows are resolved to sessions (`StepRows`): at once for the common
   message (`SessionGroup`: every row a distinct live session of the caller's, one model,
   finite x), row by row otherwise, which says what is wrong with which row.
2. **Admission.** The plan (`StepPlan`: timesteps per run and a `Reservation`) reserves the
   message's memory; the sessions' locks keep each session's steps in order. Both are taken
   at once when free and awaited otherwise.
3. **Submission.** Each model's rows go to its batcher's one entry (`Batcher.submit`), which
   runs them at once on the event loop, or queues them for a batch on the loop or in a thread.
4. **Commit.** The batcher writes the final states and step counts into the slots; the pipeline
   then marks the sessions used (`Slots.touch`) and reads their step counts for the answer.

A row whose session ended while the message waited, or whose model's run failed, drops out
alone with its error; the other rows go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from rnnserve.engine.answers import answer_bytes
from rnnserve.engine.batcher import Result, Work
from rnnserve.engine.registry import LoadedModel
from rnnserve.errors import FailedPrecondition, InvalidArgument, ServingError
from rnnserve.ops.tracing import Tracing, session_attributes
from rnnserve.state.memory import MESSAGE_COPIES, MemoryBudget, Reservation, RunCost
from rnnserve.state.session_lock import Holding, SessionLock, all_free
from rnnserve.state.sessions import Session, SessionTable
from rnnserve.state.state_store import SlotIndex

GROUP_ROW_BYTES = 32
"""A kept SessionGroup's bytes per row: a pointer in each of three lists, and an int64 slot."""
ROWS_PER_TURN = 1024
"""Rows of a message resolved one by one (some are not live here) between two turns of the event
loop: a message of thousands of unknown ids must not hold up every other call on this worker for
its whole length (another client's p99 under such messages: bench/unknown_ids.py)."""


@dataclass(frozen=True)
class RowError:
    row: int
    code: str
    message: str
    retry_after: float | None = None
    """As the error's own: when the same row may succeed if sent again."""
    cause: ServingError | None = field(default=None, compare=False, repr=False)
    """The error itself, for a caller that raises it (a v2 sequence step has one row)."""

    @classmethod
    def of(cls, row: int, error: ServingError) -> RowError:
        return cls(row, error.code, str(error), error.retry_after, error)


@dataclass
class StepOutcome:
    y: np.ndarray
    """[rows, k, outputs]; NaN in failed rows."""
    steps: list[int]
    """Each row's session's step count after the step; 0 in a failed row."""
    errors: list[RowError]
    labels: tuple[str, str] | None
    """The first live row's model and version (rows may span models); None if none is live."""


def run_error(model: LoadedModel, exc: BaseException) -> ServingError:
    """What the rows of a failed run are told (the log has the exception)."""
    return (
        exc
        if isinstance(exc, ServingError)
        else ServingError(
            f"the run of {model.spec.name} v{model.spec.version} failed; the server log has the "
            "details"
        )
    )


class ModelRun:
    """The rows of a message that one model steps in one run. A plain class: one is made per
    v2 sequence step."""

    __slots__ = ("model", "rows", "slots")

    def __init__(self, model: LoadedModel, rows: list[int] | None, slots: SlotIndex) -> None:
        self.model = model
        self.rows = rows
        """The message's rows in this run, in order; None for every row (no copy of x)."""
        self.slots = slots


class StepRows:
    """A message's rows resolved: each row's session (None for a failed row), the errors so far,
    the live rows by model, their locks and run cost, and the session table's `removals` when
    they were found (unchanged since: none of their sessions has ended). Never changed once
    made, as a stream may keep it for its next message (`StepMemo`): a row that drops out
    makes a new one."""

    __slots__ = ("sessions", "errors", "runs", "locks", "cost", "removals", "outputs")

    def __init__(
        self,
        sessions: list[Session | None],
        errors: list[RowError],
        runs: list[ModelRun],
        locks: list[SessionLock],
        cost: RunCost,
        removals: int,
        outputs: int,
    ) -> None:
        self.sessions = sessions
        self.errors = errors
        self.runs = runs
        self.locks = locks
        self.cost = cost
        self.removals = removals
        self.outputs = outputs
        """y's last dimension: the first live row's model's outputs when the rows were found
        (every live row's, as rows of other widths fail); 0 if none was live."""

    @classmethod
    def by_model(
        cls,
        sessions: list[Session | None],
        errors: list[RowError],
        removals: int,
        outputs: int | None = None,
    ) -> StepRows:
        """Rows from each row's session or None: one run per model, in the order of its first
        row."""
        rows: dict[LoadedModel, list[int]] = {}
        for row, session in enumerate(sessions):
            if session is not None:
                rows.setdefault(session.model, []).append(row)
        live = cast(list[Session], sessions)  # the rows of `rows` are live
        whole = len(rows) == 1 and not errors
        runs = [
            ModelRun(model, None if whole else mine, [live[r].slot for r in mine])
            for model, mine in rows.items()
        ]
        return cls(
            sessions,
            errors,
            runs,
            [s.lock for s in sessions if s is not None],
            RunCost(
                sum(m.cost.per_step * len(r) for m, r in rows.items()),
                sum(m.cost.per_row * len(r) for m, r in rows.items()),
            ),
            removals,
            (runs[0].model.spec.outputs if runs else 0) if outputs is None else outputs,
        )

    def without(self, failed: Mapping[int, ServingError]) -> StepRows:
        """These rows dropping out with their errors; what is left, as new rows."""
        sessions = [None if r in failed else s for r, s in enumerate(self.sessions)]
        errors = self.errors + [RowError.of(r, e) for r, e in failed.items()]
        return StepRows.by_model(sessions, errors, self.removals, self.outputs)


class SessionGroup(StepRows):
    """Rows found to be distinct live sessions of one owner and one model, without a Python
    loop over them. A stream that names the same sessions message after message (a gateway
    multiplexing its users) keeps it, and has them looked up once, while no session of this
    process has ended since (`SessionTable.removals` unchanged)."""

    __slots__ = ("ids", "owner", "model")

    def __init__(
        self, owner: str, model: LoadedModel, sessions: list[Session], removals: int
    ) -> None:
        rows = len(sessions)
        super().__init__(
            cast(list[Session | None], sessions),
            [],
            [ModelRun(model, None, np.array([s.slot for s in sessions], np.int64))],
            [s.lock for s in sessions],
            RunCost(model.cost.per_step * rows, model.cost.per_row * rows),
            removals,
            model.spec.outputs,
        )
        self.ids = [s.id for s in sessions]  # the sessions' own strings: no copies kept
        self.owner = owner
        self.model = model

    @property
    def nbytes(self) -> int:
        """What keeping it costs: a pointer per row in each of three lists, and a slot."""
        return GROUP_ROW_BYTES * len(self.sessions)

    def holds(self, session_ids: list[str], owner: str, removals: int) -> bool:
        return (
            removals == self.removals
            and owner == self.owner
            and (session_ids is self.ids or session_ids == self.ids)
        )

    def takes(self, x: np.ndarray) -> bool:
        """x fits the model, and is finite (else `resolve` names the rows that are not)."""
        return self.model.spec.features == x.shape[2] and bool(np.isfinite(x).all())


class StepMemo:
    """What one stream's last step resolved; the stream hands it to every `Engine.step`, and
    to `Engine.forget` when it ends. A group is kept only while the memory budget holds its
    `nbytes` (2,048 streams each keeping 10,000 sessions would be 650 MiB)."""

    __slots__ = ("group",)

    def __init__(self) -> None:
        self.group: SessionGroup | None = None


StepPlan = tuple[int, Reservation]
"""Timesteps per run (a long message runs in spans, the state carried between them, which is
exact), and the whole message's memory: its messages plus one span's run. A tuple: one is made
per step."""


class StepPipeline:
    """Rows → admission → the batchers → commit, for the engine's steps."""

    def __init__(
        self,
        sessions: SessionTable,
        budget: MemoryBudget,
        max_message_bytes: int,
        tracing: Tracing,
    ) -> None:
        self._sessions = sessions
        self._budget = budget
        self._max_message_bytes = max_message_bytes
        self._tracing = tracing

    # Rows

    def group(self, session_ids: list[str], owner: str) -> SessionGroup | None:
        """The common message's rows, proved fine without a Python loop over them: every id a
        distinct live session of the caller's, all of one model. None sends the message the
        row-by-row way (`resolve`), which says what is wrong with which row. Multiplexed, the
        row-by-row way costs about ten times this one per session-step (docs/benchmarks.md)."""
        sessions = self._sessions.all_owned(session_ids, owner)
        if sessions is None or len(set(session_ids)) != len(session_ids):
            return None
        models = {s.model for s in sessions}
        if len(models) != 1:
            return None
        return SessionGroup(owner, models.pop(), sessions, self._sessions.removals)

    def one(self, session: Session) -> StepRows:
        """One session's rows (a v2 sequence step)."""
        model = session.model
        return StepRows(
            [session],
            [],
            [ModelRun(model, None, [session.slot])],
            [session.lock],
            model.cost,
            self._sessions.removals,
            model.spec.outputs,
        )

    async def resolve(
        self,
        session_ids: list[str],
        x: np.ndarray,
        owner: str,
        failed: dict[str, ServingError],
    ) -> StepRows:
        """Each row's session or error, letting other calls run every ROWS_PER_TURN rows
        (a session that ends meanwhile is caught at admission: `removals` is taken first)."""
        removals = self._sessions.removals
        # One check of the whole on the common path; rows are told apart only when one is off.
        # (np.isfinite: a sum would need np.errstate against overflow, which costs more.)
        finite = np.isfinite(x)
        bad_values = None if finite.all() else ~finite.all(axis=(1, 2))
        sessions: list[Session | None] = []
        errors: list[RowError] = []
        seen: set[str] = set()
        outputs = None
        for row, session_id in enumerate(session_ids):
            if row and not row % ROWS_PER_TURN:
                await asyncio.sleep(0)
            try:
                if session_id in seen:
                    raise InvalidArgument(
                        f"session {session_id} appears twice in one message; "
                        "send its timesteps together as one row"
                    )
                seen.add(session_id)
                if session_id in failed:
                    raise failed[session_id]
                session = self._sessions.get(session_id, owner)
                spec = session.model.spec
                if spec.features != x.shape[2]:
                    raise InvalidArgument(
                        f"session {session_id} ({spec.name}) takes "
                        f"{spec.features} features per step, got {x.shape[2]}"
                    )
                if outputs not in (None, spec.outputs):
                    raise InvalidArgument(
                        f"session {session_id} ({spec.name}) has "
                        f"{spec.outputs} outputs, unlike the message's first "
                        "session; send it in its own message"
                    )
                if bad_values is not None and bad_values[row]:
                    raise InvalidArgument(f"timesteps for session {session_id} contain NaN or Inf")
                outputs = spec.outputs
                sessions.append(session)
            except ServingError as exc:
                sessions.append(None)
                errors.append(RowError.of(row, exc))
        return StepRows.by_model(sessions, errors, removals)

    # Memo

    def remember(self, memo: StepMemo, group: SessionGroup) -> None:
        """Keep `group` for the stream's next message, if the memory budget has room now."""
        if self._budget.hold(group.nbytes):
            memo.group = group

    def forget(self, memo: StepMemo) -> None:
        """Let go of what a stream kept: it ended, or named other sessions."""
        if memo.group is not None:
            self._budget.release(memo.group.nbytes)
            memo.group = None

    # Admission, submission, commit

    def plan(self, first: LoadedModel, x: np.ndarray, cost: RunCost) -> StepPlan:
        """Timesteps per run and the message's reservation; refused up front (nothing touched
        yet) when its answer or one timestep's run could never fit."""
        rows, k = x.shape[:2]
        budget = self._budget
        answer = answer_bytes(first.spec, rows, k, False, self._max_message_bytes)
        chunk = budget.chunk
        one = cost.run(1, 1)
        if one > chunk:  # the refusals' messages are made only when they are said
            budget.check_run(
                one, f"one timestep of {rows} sessions", "send fewer sessions per message"
            )
        span = min(k, max(1, (chunk - cost.per_row) // cost.per_step))
        total = MESSAGE_COPIES * answer + 2 * x.nbytes + cost.run(1, span)
        if total > budget.capacity:
            budget.check(
                total,
                f"a step of {rows} sessions x {k} timesteps",
                "send fewer sessions or timesteps per message",
            )
        return span, Reservation(budget, total)

    def plan_of(self, rows: StepRows, x: np.ndarray) -> StepPlan:
        """`plan` for rows with a live row."""
        return self.plan(rows.runs[0].model, x, rows.cost)

    def now(self, rows: StepRows, x: np.ndarray, plan: StepPlan) -> StepOutcome | None:
        """The step done here and now, with no await, when nothing has to be waited for: the
        memory fits, every lock is free, the message is one span of one model's run, and its
        batcher runs it at once (`Batcher.submit` with `only_now`). Nothing can come between
        these checks and the commit, so the memory and the locks need only be free, not taken
        and given back, and the caller awaits no coroutine: a stream's or a v2 sequence's lone
        step (what that saves: docs/benchmarks.md). None: `advance` it."""
        span, reserve = plan
        if (
            len(rows.runs) != 1
            or span < x.shape[1]
            or not self._budget.fits(reserve.nbytes)
            or not all_free(rows.locks)
        ):
            return None
        if rows.removals != self._sessions.removals:
            rows = self._still_live(rows)
            if len(rows.runs) != 1:  # its sessions ended: the general way says so
                return None
        run = rows.runs[0]
        try:
            done = run.model.batcher.submit(
                x if run.rows is None else x[run.rows], run.slots, only_now=True
            )
        except Exception as exc:  # a failed run fails its own rows only
            y, rows = _joined(rows, x, [exc])
        else:
            if done is None:  # its batcher would queue it: `advance` waits for it
                return None
            ran: list[Result | Work | Exception] = [done]
            y, rows = _joined(rows, x, ran)
        if self._tracing.on and self._tracing.recording():
            return self._traced_commit(rows, y)
        return self._commit(rows, y)

    async def advance(
        self, rows: StepRows, x: np.ndarray, plan: StepPlan | None = None
    ) -> StepOutcome:
        """Step each live row's session by x's timesteps (`plan`: the one a caller made before
        it touched anything): at once when `now` can, else once the memory and the sessions'
        locks are held (taken at once when free, awaited otherwise), through the batchers'
        queues."""
        if not rows.runs:  # every row failed
            return self._commit(rows, np.full((*x.shape[:2], 0), np.nan, np.float32))
        span, reserve = self.plan_of(rows, x) if plan is None else plan
        done = self.now(rows, x, (span, reserve))
        if done is not None:
            return done
        asked = asyncio.get_running_loop().time() if self._tracing.on else 0.0
        async with reserve, Holding(rows.sessions, rows.locks):
            if self._tracing.on and self._tracing.recording():
                self._traced("admission wait", rows, asked)
            if rows.removals != self._sessions.removals:
                rows = self._still_live(rows)
            parts = []
            for t in range(0, x.shape[1], span):
                part = x if span >= x.shape[1] else np.ascontiguousarray(x[:, t : t + span])
                results = self._submit(rows, part)
                await _outcomes(rows, results)
                y, rows = _joined(rows, part, results)
                parts.append(y)
        y = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if self._tracing.on and self._tracing.recording():
            return self._traced_commit(rows, y)
        return self._commit(rows, y)

    def _still_live(self, rows: StepRows) -> StepRows:
        """The rows without those whose session ended (closed, evicted or moved away) since
        they were resolved (the table's `removals` moved meanwhile)."""
        ended = {
            r: FailedPrecondition(f"session {s.id} ended before this step ran")
            for r, s in enumerate(rows.sessions)
            if s is not None and self._sessions.ended(s)
        }
        return rows.without(ended) if ended else rows

    @staticmethod
    def _submit(rows: StepRows, x: np.ndarray) -> list[Result | Work | Exception]:
        """Each run handed to its model's batcher: its result when it ran at once, its queued
        work, or the error of a run that failed at once."""
        results: list[Result | Work | Exception] = []
        for run in rows.runs:
            try:
                done = run.model.batcher.submit(x if run.rows is None else x[run.rows], run.slots)
                assert done is not None  # None only for only_now
                results.append(done)
            except Exception as exc:  # a failed run fails its own rows only
                results.append(exc)
        return results

    def _traced(self, name: str, rows: StepRows, started: float) -> None:
        """A span of this step from `started` (the loop's clock) to now, under the call's."""
        now = asyncio.get_running_loop().time()
        live = [s for s in rows.sessions if s is not None]
        labels = live[0].model.labels if live else ("", "")
        attributes = session_attributes(len(live), live[0].id if len(live) == 1 else "", labels)
        self._tracing.record(name, None, started, now, attributes, now)

    def _traced_commit(self, rows: StepRows, y: np.ndarray) -> StepOutcome:
        started = asyncio.get_running_loop().time()
        outcome = self._commit(rows, y)
        self._traced("commit", rows, started)
        return outcome

    def _commit(self, rows: StepRows, y: np.ndarray) -> StepOutcome:
        """The live rows' sessions marked used now, and each row's step count."""
        now = self._sessions.clock()
        runs = rows.runs
        if len(runs) == 1 and runs[0].rows is None:
            run = runs[0]
            return StepOutcome(y, run.model.store.touch(run.slots, now), [], run.model.labels)
        steps = [0] * len(rows.sessions)
        for run in runs:
            for row, count in zip(cast(list[int], run.rows), run.model.store.touch(run.slots, now)):
                steps[row] = count
        errors = sorted(rows.errors, key=lambda e: e.row)
        labels = min(runs, key=lambda r: cast(list[int], r.rows)[0]).model.labels if runs else None
        return StepOutcome(y, steps, errors, labels)


async def _outcomes(rows: StepRows, results: list[Result | Work | Exception]) -> None:
    """Each queued run's result or error in place of its work, once its batch has run."""
    queued = [i for i, r in enumerate(results) if isinstance(r, Work)]
    if len(queued) == 1:
        try:
            results[queued[0]] = await cast(Work, results[queued[0]]).outcome()
        except Exception as exc:  # CancelledError passes: the caller left
            results[queued[0]] = exc
        return
    if queued:
        done = await asyncio.gather(
            *(cast(Work, results[i]).outcome() for i in queued), return_exceptions=True
        )
        for i, result in zip(queued, done):
            if isinstance(result, asyncio.CancelledError):
                raise result
            results[i] = cast(Result | Exception, result)


def _joined(
    rows: StepRows, x: np.ndarray, results: list[Result | Work | Exception]
) -> tuple[np.ndarray, StepRows]:
    """y [rows, k, outputs] from the runs' results, NaN where a row failed; the rows whose
    model's run failed drop out (their sessions as they were) for later spans and the
    commit."""
    runs = rows.runs
    if len(runs) == 1 and runs[0].rows is None and isinstance(results[0], tuple):
        return results[0][0], rows
    y = np.full((*x.shape[:2], rows.outputs), np.nan, np.float32)
    failed: dict[int, ServingError] = {}
    for run, result in zip(runs, results):
        if isinstance(result, tuple):
            y[slice(None) if run.rows is None else run.rows] = result[0]
            continue
        error = run_error(run.model, cast(BaseException, result))
        failed.update((r, error) for r in (range(len(x)) if run.rows is None else run.rows))
    return y, rows.without(failed) if failed else rows
