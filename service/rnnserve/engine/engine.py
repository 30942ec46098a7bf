"""The engine both front doors call: models as the doors see them, validation, whole-sequence
prediction, the session lifecycle, and the entry points of steps (native and v2 sequences).

A step's way from admission to commit is steps.py's; sessions that live in another process
come and go through moves.py. Plain numpy in, plain numpy out; errors are rnnserve.errors
classes. No gRPC here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from rnnserve.engine.answers import answer_bytes
from rnnserve.engine.moves import SessionMoves, states_of
from rnnserve.engine.registry import LoadedModel, ModelRegistry
from rnnserve.engine.sources import (
    SharedStore,
    SiblingWorkers,
    store_key,
)
from rnnserve.engine.steps import StepMemo, StepOutcome, StepPipeline
from rnnserve.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
)
from rnnserve.models.contract import ModelSpec
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.logs import Throttled
from rnnserve.ops.metrics import Metrics
from rnnserve.state.memory import MESSAGE_COPIES, MemoryBudget, Reservation
from rnnserve.state.sessions import Session, SessionTable

log = logging.getLogger(__name__)
store_log = Throttled(__name__)
"""The store's outages: one line per cause a minute, not one per call."""
UNKNOWN_MODEL = "(unknown)"


@dataclass(frozen=True)
class ModelView:
    """A model version as the front doors describe it: the engine's answer, not its internals."""

    spec: ModelSpec
    versions: list[int]
    """Every version of this model open for new work, ascending."""
    state: str
    """READY, LOADING or UNAVAILABLE (draining): KServe's repository index names."""

    @property
    def ready(self) -> bool:
        """False while the version loads and once the server drains."""
        return self.state == "READY"

    @property
    def labels(self) -> tuple[str, str]:
        return self.spec.name, str(self.spec.version)


@dataclass(frozen=True)
class SessionView:
    """A session as its client sees it, taken when the call that returns it ran."""

    session_id: str
    model: str
    version: int
    steps: int

    @property
    def labels(self) -> tuple[str, str]:
        return self.model, str(self.version)

    @classmethod
    def of(cls, session: Session) -> SessionView:
        return cls(session.id, session.model.spec.name, session.model.spec.version, session.steps)


@dataclass(frozen=True)
class PredictResult:
    model: ModelView
    y: np.ndarray
    final_states: dict[str, np.ndarray]


@dataclass
class SequenceStep:
    y: np.ndarray
    states: dict[str, np.ndarray] | None
    """The states after the step, by input name, when asked for."""


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise InvalidArgument(f"{what} contains NaN or Inf")


class Engine:
    """What the front doors and the server call, and all they call: models, sessions, drain."""

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        sessions: SessionTable,
        budget: MemoryBudget,
        handoff: SharedStore | None = None,
        siblings: SiblingWorkers | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self._registry = registry
        self._sessions = sessions
        self.moves = SessionMoves(config, registry, sessions, handoff, siblings)
        """Sessions to and from sibling workers and other replicas."""
        self.metrics: Metrics = registry.metrics
        self._draining = False
        self._steps = StepPipeline(
            sessions, budget, config.max_message_bytes, registry.metrics.tracing
        )

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle_timeout(self) -> float:
        """Seconds without a step after which a session is evicted."""
        return self._sessions.idle_timeout

    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    @property
    def ready(self) -> bool:
        """Ready for new work: not draining, and some model version is loaded and ready."""
        return not self._draining and bool(self._registry.serving())

    def models(self) -> list[ModelView]:
        """Every version open for new work, then those still loading (not ready)."""
        served = [self._view(m) for m in self._registry.serving()]
        return served + [
            ModelView(spec, self._registry.versions(spec.name), "LOADING")
            for spec in self._registry.loading()
        ]

    def describe(self, name: str, version: int = 0) -> ModelView:
        """The named version, or the latest; NOT_FOUND or UNAVAILABLE (loading) otherwise."""
        return self._view(self._registry.get(name, version))

    def model_label(self, name: str) -> str:
        """The metrics label for a requested model: its name when this server knows it, one
        fixed label otherwise, so clients cannot mint label values (one time series each)."""
        return name if self._registry.knows(name) else UNKNOWN_MODEL

    def model_ready(self, name: str, version: int = 0) -> bool:
        try:
            return self.describe(name, version).ready
        except (NotFound, Unavailable):
            return False

    def _view(self, model: LoadedModel) -> ModelView:
        return ModelView(
            model.spec,
            self._registry.versions(model.spec.name),
            "UNAVAILABLE" if self._draining else "READY",
        )

    async def sync_models(self, changed: Callable[[], Awaitable[None]] | None = None) -> None:
        """Load versions that appeared in the repository, retire those that disappeared;
        `changed` is awaited whenever what is loading or served changes."""
        await self._registry.sync(changed)

    async def sweep_idle(self) -> int:
        """The idle sweep: spill idle sessions to the store (with --session-ttl), evict those
        idle past their end, settle moves to siblings, and drop the shared table's rows of
        sessions this worker lost track of (none, unless a bug). How many were evicted."""
        try:
            await self.moves.spill_idle()
        except ServingError as exc:  # the workers' shared table failed: tried next sweep
            log.warning("idle sessions stay in memory this sweep: %s", exc)
        evicted = self._sessions.evict_idle()
        lost = self._sessions.reconcile(self.moves.settle(time.monotonic()))
        if lost:
            log.error("LOST %d sessions recorded as held here that are not", lost)
            self.metrics.lost.labels("move").inc(lost)
        return evicted

    def drain(self) -> None:
        """From now on new work is refused with UNAVAILABLE (in-flight work still finishes) and
        no model reports ready."""
        self._draining = True

    async def shutdown(self) -> None:
        """After the drain: end the sessions left here, unload the models, close the store."""
        self._sessions.close_all("ended by a server shutdown")
        await self._registry.close()
        await self.moves.close()

    @property
    def closing_message(self) -> str:
        if self.moves.shared:
            return (
                "the server is shutting down; reconnect (to another replica) and resume "
                "your session by id"
            )
        return (
            "the server is shutting down and its sessions end with it (no --state-store); "
            "reconnect to another replica and open a new session"
        )

    def check_open(self) -> None:
        """UNAVAILABLE once draining: callers reconnect, and resume their sessions elsewhere
        where a shared store holds them."""
        if self._draining:
            raise Unavailable(self.closing_message, retry_after=1.0)

    def _check_x(self, model: LoadedModel, x: np.ndarray, what: str) -> None:
        spec = model.spec
        if x.ndim != 3 or x.shape[2] != spec.features:
            raise InvalidArgument(
                f"{what} must be [rows, timesteps, {spec.features}] for "
                f"{spec.name}, got shape {list(x.shape)}"
            )
        self._check_limits(x, what)

    def _check_limits(self, x: np.ndarray, what: str) -> None:
        """x is [rows (sequences or sessions), timesteps, features]."""
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise InvalidArgument(f"{what} is empty (shape {list(x.shape)})")
        if x.shape[0] > self.config.max_batch_rows:
            raise InvalidArgument(
                f"{what} has {x.shape[0]} rows (sequences or sessions); the "
                f"limit is {self.config.max_batch_rows} (--max-batch-rows)"
            )
        if x.shape[1] > self.config.max_timesteps:
            raise InvalidArgument(
                f"{what} has {x.shape[1]} timesteps per row; the limit is "
                f"{self.config.max_timesteps} (--max-timesteps)"
            )

    def _states(
        self, model: LoadedModel, given: dict[str, np.ndarray], rows: int
    ) -> list[np.ndarray]:
        """Given states in the model's order, [rows, size] each; missing ones are zeros."""
        known = {s.input: s for s in model.spec.states}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidArgument(
                f"unknown state {', '.join(unknown)}; {model.spec.name} has {', '.join(known)}"
            )
        states = []
        for name, spec in known.items():
            state = given.get(name)
            if state is None:
                states.append(np.zeros((rows, spec.size), np.float32))
                continue
            if rows == 1 and state.shape == (spec.size,):
                state = state[None]
            if state.shape != (rows, spec.size):
                raise InvalidArgument(
                    f"state {name} must be [{rows}, {spec.size}], got {list(state.shape)}"
                )
            _check_finite(state, f"state {name}")
            states.append(np.ascontiguousarray(state, np.float32))
        return states

    async def predict(
        self,
        name: str,
        version: int,
        x: np.ndarray,
        lengths: list[int],
        initial_states: dict[str, np.ndarray],
        last_only: bool,
    ) -> PredictResult:
        self.check_open()
        model = self._registry.get(name, version)
        self._check_x(model, x, "x")
        rows, time = x.shape[:2]
        lens = np.asarray(lengths or [time] * rows, np.int64)
        if len(lens) != rows or lens.min() < 1 or lens.max() > time:
            raise InvalidArgument(f"lengths must hold {rows} values in 1..{time}")
        _check_finite(x, "x")
        states = self._states(model, initial_states, rows)
        chunk, reserve = self._predict_plan(model, x, last_only)
        async with reserve:
            y, finals = await self._predict_chunks(model, x, lens, states, last_only, chunk)
        names = [s.input for s in model.spec.states]
        return PredictResult(self._view(model), y, dict(zip(names, finals)))

    def _predict_plan(
        self, model: LoadedModel, x: np.ndarray, last_only: bool
    ) -> tuple[int, Reservation]:
        """Rows per run, and the reservation for the whole call: its messages plus one run."""
        rows, time = x.shape[:2]
        answer = answer_bytes(
            model.spec, rows, 1 if last_only else time, True, self.config.max_message_bytes
        )
        one_row = model.cost.run(1, time)
        self.budget.check_run(
            one_row,
            f"one sequence of {time} timesteps",
            "split long sequences and carry the state over (a session, or "
            "initial_states from the last call's final_states)",
        )
        chunk = min(rows, self.budget.chunk // one_row)
        total = MESSAGE_COPIES * answer + 2 * x.nbytes + model.cost.run(chunk, time)
        return chunk, self.budget.reserve(
            total,
            f"a Predict of {rows} sequences x {time} timesteps",
            "send fewer sequences per call",
        )

    async def _predict_chunks(
        self,
        model: LoadedModel,
        x: np.ndarray,
        lens: np.ndarray,
        states: list[np.ndarray],
        last_only: bool,
        chunk: int,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runs of `chunk` rows one after another, so a large call's peak stays bounded."""
        rows = x.shape[0]
        if chunk >= rows:
            y, finals = await self._predict_rows(model, x, lens, states)
            return (y[np.arange(rows), lens - 1] if last_only else y), finals
        shape = (rows, model.spec.outputs) if last_only else (*x.shape[:2], model.spec.outputs)
        y = np.zeros(shape, np.float32)
        finals = [np.empty_like(s) for s in states]
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            y_part, finals_part = await self._predict_rows(
                model, x[part], lens[part], [s[part] for s in states]
            )
            y[part] = y_part[np.arange(len(y_part)), lens[part] - 1] if last_only else y_part
            for out, final in zip(finals, finals_part):
                out[part] = final
        return y, finals

    async def _predict_rows(
        self, model: LoadedModel, x: np.ndarray, lens: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if (lens == x.shape[1]).all():
            return await model.batcher.run(x, states=states)
        return await self._predict_ragged(model, x, lens, states)

    async def _predict_ragged(
        self, model: LoadedModel, x: np.ndarray, lens: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Sequences of each length run as their own group: exact, no padded steps in the state."""
        groups = [np.flatnonzero(lens == n) for n in np.unique(lens)]
        results = await asyncio.gather(
            *(  # every group ends before the call (and its memory)
                model.batcher.run(
                    np.ascontiguousarray(x[idx, : lens[idx[0]]]), states=[s[idx] for s in states]
                )
                for idx in groups
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        y = np.zeros((*x.shape[:2], model.spec.outputs), np.float32)
        finals = [np.empty_like(s) for s in states]
        ran = cast(list[tuple[np.ndarray, list[np.ndarray]]], results)  # none failed
        for idx, (y_group, final_group) in zip(groups, ran):
            y[idx, : y_group.shape[1]] = y_group
            for out, part in zip(finals, final_group):
                out[idx] = part
        return y, finals

    async def open_session(
        self,
        name: str,
        version: int,
        initial_states: dict[str, np.ndarray],
        session_id: str = "",
        owner: str = "",
    ) -> SessionView:
        self.check_open()
        model = self._registry.get(name, version)
        states = self._states(model, initial_states, 1) if initial_states else None
        if self.moves.spilling:
            await self.moves.make_room(1)
        if not (session_id and self.moves.shared):
            return SessionView.of(self._open(model, states, session_id, owner))
        session = self._sessions.open(model, states, session_id, owner)
        session.lock.take()  # nothing steps or moves it before the check is done
        try:
            await self.moves.only_one_across_replicas(session)
        except BaseException:  # refused, or the caller left mid-check: it never opened
            if self._sessions.release(session):
                self._sessions.left(session.owner, session.id)
            self.moves.unclaim(session.owner, session.id)  # if the store recorded it after all
            raise
        finally:
            session.lock.release()
        return SessionView.of(session)

    def _open(
        self, model: LoadedModel, states: list[np.ndarray] | None, session_id: str, owner: str
    ) -> Session:
        """A new session, recorded as held here so other replicas can ask for it."""
        session = self._sessions.open(model, states, session_id, owner)
        self.moves.claim([store_key(owner, session.id)])
        return session

    async def resume_session(self, session_id: str, owner: str = "") -> SessionView:
        """The caller's live session, adopted from the shared store if another replica parked
        it: what a stream's `resume` answers."""
        return SessionView.of(await self._find(session_id, owner))

    async def _find(self, session_id: str, owner: str) -> Session:
        self.check_open()
        return await self._session(session_id, owner)

    async def _session(self, session_id: str, owner: str) -> Session:
        """The owner's session by id, adopting it first if another replica parked it (no
        coroutine to ask for it where no other process can hold it)."""
        if self.moves.elsewhere:
            failed = await self.moves.adopt([session_id], alone=True, owner=owner)
            if session_id in failed:
                raise failed[session_id]
        return self._sessions.get(session_id, owner)

    async def step(
        self, session_ids: list[str], x: np.ndarray, owner: str = "", memo: StepMemo | None = None
    ) -> StepOutcome:
        """Advance each row's session by x's k timesteps. Rows fail alone; others proceed.
        A stream passes its own `memo`, so that naming the same sessions again costs no
        lookups."""
        self.check_open()
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] != len(session_ids):
            raise InvalidArgument(
                f"x must be [{len(session_ids)} sessions, timesteps, features]"
                f", got shape {list(x.shape)}"
            )
        self._check_limits(x, "x")
        if len(session_ids) > self._sessions.max_sessions:
            raise InvalidArgument(
                f"a message names {len(session_ids)} sessions; no more than --max-sessions "
                f"({self._sessions.max_sessions}) can be live in one process, so more are never "
                "looked for: send them in several messages"
            )
        group = memo.group if memo is not None else None
        failed: dict[str, ServingError] = {}
        fresh = group is None or not group.holds(session_ids, owner, self._sessions.removals)
        if fresh:
            if memo is not None:
                self._steps.forget(memo)
            failed = (
                await self.moves.adopt(session_ids, alone=False, owner=owner)
                if self.moves.elsewhere
                else {}
            )  # no coroutine on the common path
            group = None if failed else self._steps.group(session_ids, owner)
        if group is not None and group.takes(x):
            plan = self._steps.plan_of(group, x)
            outcome = self._steps.now(group, x, plan) or await self._steps.advance(group, x, plan)
            if fresh and memo is not None:  # after the step: it never waits for the memo
                self._steps.remember(memo, group)
            return outcome
        rows = await self._steps.resolve(session_ids, x, owner, failed)
        return await self._steps.advance(rows, x)

    def kept_sessions(self, memo: StepMemo) -> list[str]:
        """The ids of the sessions a stream keeps from its previous step (what `same_sessions`
        names)."""
        if memo.group is None:
            raise FailedPrecondition(
                "this stream keeps no sessions from its previous step (it "
                "named none, some of its rows failed, or the memory budget "
                "had no room to keep them): send session_ids"
            )
        return memo.group.ids

    def forget(self, memo: StepMemo) -> None:
        """Let go of what a stream kept: it ended, or named other sessions."""
        self._steps.forget(memo)

    async def sequence_step(
        self,
        name: str,
        version: int,
        session_id: str,
        x: np.ndarray,
        states: dict[str, np.ndarray],
        start: bool,
        end: bool,
        with_states: bool,
        owner: str,
    ) -> SequenceStep:
        """One request of a v2 sequence: start (replacing an earlier sequence of that id), step,
        read the states and end, all under the session's lock. Everything the client sent is
        checked before the earlier sequence is touched, and a start whose step fails leaves no
        sequence open."""
        self.check_open()
        model = self._registry.get(name, version)
        spec = model.spec
        if x.ndim != 3 or x.shape[0] != 1:
            raise InvalidArgument(
                f"a sequence request carries one sequence: x must be "
                f"[1, time, {spec.features}], got {list(x.shape)}"
            )
        self._check_x(model, x, "x")
        _check_finite(x, "x")
        plan = self._steps.plan(model, x, model.cost)
        if start:
            initial = self._states(model, states, 1) if states else None
            try:
                await self.close_session(session_id, owner)  # a restart begins afresh
            except (NotFound, FailedPrecondition):
                pass
            except Unavailable as exc:  # the store is down: a new sequence needs none of it
                store_log.warning(
                    "store-down-start",
                    "sequence %s started without asking the "
                    "shared state store for an earlier one (%s)",
                    session_id,
                    exc,
                )
            if self.moves.spilling:
                await self.moves.make_room(1)
            session = self._open(model, initial, session_id, owner)
        elif states:
            raise InvalidArgument(
                "state inputs belong on the sequence_start request; the "
                "server carries the state after that"
            )
        else:
            try:
                session = await self._find(session_id, owner)
            except (NotFound, FailedPrecondition) as exc:
                raise InvalidArgument(
                    f"this sequence of model {spec.name!r} is not open: send "
                    f"sequence_start=true on its first request ({exc})"
                ) from None
        try:
            rows = self._steps.one(session)
            outcome = self._steps.now(rows, x, plan) or await self._steps.advance(rows, x, plan)
            if outcome.errors:
                raise cast(ServingError, outcome.errors[0].cause)
            # Under no lock, but with no await since the step: nothing came between.
            current = states_of(session) if with_states else None
            if end:
                self._sessions.close(session, "ended by sequence_end")
            return SequenceStep(outcome.y, current)
        except BaseException:
            if start:
                self._sessions.close(session, "failed on its first step")
            raise

    async def reset_session(self, session_id: str, owner: str = "") -> SessionView:
        session = await self._find(session_id, owner)
        async with session.lock:
            session.model.store.zero(session.slot)  # its state and its step count
            session.last_used = self._sessions.clock()
            return SessionView.of(session)

    async def session_state(
        self, session_id: str, owner: str = ""
    ) -> tuple[SessionView, dict[str, np.ndarray]]:
        """The session and a copy of its state tensors, taken together under its lock."""
        session = await self._find(session_id, owner)
        async with session.lock:
            states = states_of(session)
            session.last_used = self._sessions.clock()
            return SessionView.of(session), states

    async def close_session(self, session_id: str, owner: str = "") -> SessionView:
        session = await self._session(session_id, owner)
        async with session.lock:
            view = SessionView.of(session)  # before its slot goes back to the store
            self._sessions.close(session, "closed by its client")
            return view
