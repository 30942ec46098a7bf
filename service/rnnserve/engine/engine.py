"""The engine both front doors call: validation, whole-sequence prediction and session steps.

Plain numpy in, plain numpy out; errors are rnnserve.errors classes. No gRPC here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

from rnnserve.engine.answers import answer_bytes
from rnnserve.engine.registry import LoadedModel, ModelRegistry
from rnnserve.engine.sources import (
    MOVE_CALL_TIMEOUT,
    Adoption,
    Moves,
    ParkedSession,
    SharedStore,
    SiblingWorkers,
    StoreUnavailable,
    store_key,
)
from rnnserve.engine.steps import StepMemo, StepOutcome, StepPipeline
from rnnserve.errors import (
    AlreadyExists,
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
from rnnserve.state.session_lock import Holding
from rnnserve.state.sessions import Session, SessionTable

log = logging.getLogger(__name__)
T = TypeVar("T")
store_log = Throttled(__name__)
"""The store's outages: one line per cause a minute, not one per call."""
UNKNOWN_MODEL = "(unknown)"
MOVE_WINDOW = 2.0
"""Seconds a session that moved to a sibling is said to be on its way (its asker restores it
within milliseconds): a third worker asking meanwhile asks again instead of answering NOT_FOUND
or "ended before this step ran", as it did for clients stepping the same sessions through
several workers (tests/test_workers.py)."""
LEND_TIMEOUT = MOVE_CALL_TIMEOUT + 1.0
"""Seconds after which a session let go to a sibling has arrived there or never will: the
sibling's call has passed its deadline."""
MOVE_POLL = 0.002
MOVE_POLL_MAX = 0.05
"""Seconds between asks for a session that is busy elsewhere or on its way: doubling from the
first to the last."""


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


@dataclass(frozen=True)
class SequenceStep:
    y: np.ndarray
    states: dict[str, np.ndarray] | None
    """The states after the step, by input name, when asked for."""


def _states_of(session: Session) -> dict[str, np.ndarray]:
    """A copy of the session's state tensors by name (the caller holds its lock)."""
    return {
        spec.input: state
        for spec, state in zip(session.model.spec.states, session.model.store.read(session.slot))
    }


def _parked(session: Session, now: float) -> ParkedSession:
    """The session as it leaves this process (the caller holds its lock)."""
    return ParkedSession(
        session.id,
        session.owner,
        session.model.spec.name,
        session.model.spec.version,
        session.steps,
        now - session.last_used,
        _states_of(session),
        session.model.graph,
    )


def _forget_before(times: OrderedDict, cutoff: float) -> None:
    """Drop the entries older than `cutoff` from a map kept in the order of its times."""
    while times and next(iter(times.values())) < cutoff:
        times.popitem(last=False)


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
        self._handoff = handoff
        self._siblings = siblings
        self._elsewhere = handoff is not None or siblings is not None
        """Sessions not live here may be held by a sibling worker or another replica."""
        self._claims: list[str] = []
        self._unclaims: list[tuple[str, str]] = []
        self._claiming: asyncio.Task | None = None
        if handoff is not None:
            sessions.on_end = self._unclaim
        self._moved_away: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(owner, id) of sessions released to a sibling in the last MOVE_WINDOW, by when."""
        self._lent: dict[tuple[str, str], tuple[Session, float]] = {}
        """Sessions let go to a sibling, their slots kept until the move is settled."""
        self._background: set[asyncio.Task] = set()
        """Give-backs of sessions that arrived for callers that had given up."""
        self._claim_ttl_ms = int(2 * config.session_idle_timeout * 1000)
        self.metrics: Metrics = registry.metrics
        self._draining = False
        self._steps = StepPipeline(
            sessions, budget, config.max_message_bytes, registry.metrics.tracing
        )

    @property
    def _store(self) -> SharedStore:
        """The shared store, in code that runs only with one (--state-store)."""
        assert self._handoff is not None
        return self._handoff

    @property
    def _workers(self) -> SiblingWorkers:
        """The sibling workers, in code that runs only with some (--workers > 1)."""
        assert self._siblings is not None
        return self._siblings

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

    def evict_idle(self) -> int:
        """The idle sweep: evict idle sessions, settle moves to siblings, and drop the shared
        table's rows of sessions this worker lost track of (none, unless a bug)."""
        evicted = self._sessions.evict_idle()
        now = time.monotonic()
        _forget_before(self._moved_away, now - MOVE_WINDOW)
        self._settle_lent(now)
        lost = self._sessions.reconcile(self._moved_away.keys() | self._lent.keys())
        if lost:
            log.error("LOST %d sessions recorded as held here that are not", lost)
            self.metrics.lost.labels("move").inc(lost)
        return evicted

    def _settle_lent(self, now: float) -> None:
        """Moves to siblings are two-phase: the session leaves the table but keeps its slot,
        and its row is marked lent, until the asker's restore re-points the row. After
        LEND_TIMEOUT the asker's call has ended either way: a row still marked lent by this
        worker means the session never arrived, so it is live here again."""
        claims = self._sessions.claims
        for key, (session, since) in list(self._lent.items()):
            if now - since < LEND_TIMEOUT:
                break  # in the order they were lent
            try:
                back = claims is not None and claims.take_back(*key)
            except ServingError:
                continue  # the table failed: settled at a later sweep
            del self._lent[key]
            if back and self._sessions.find(session.id, session.owner) is None:
                self._sessions.revive(session)
                log.warning(
                    "session %s was let go to a sibling that never took it (its call "
                    "failed): live here again",
                    session.id,
                )
            else:
                self._sessions.free(session)

    def drain(self) -> None:
        """From now on new work is refused with UNAVAILABLE (in-flight work still finishes) and
        no model reports ready."""
        self._draining = True

    async def shutdown(self) -> None:
        """After the drain: end the sessions left here, unload the models, close the store."""
        self._sessions.close_all("ended by a server shutdown")
        await self._registry.close()
        if self._handoff is not None:
            await self._handoff.close()
        if self._siblings is not None:
            await self._siblings.close()

    @property
    def closing_message(self) -> str:
        if self._handoff is not None:
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
        if not (session_id and self._handoff is not None):
            return SessionView.of(self._open(model, states, session_id, owner))
        session = self._sessions.open(model, states, session_id, owner)
        session.lock.take()  # nothing steps or moves it before the check is done
        try:
            await self._only_one_across_replicas(session)
        except BaseException:  # refused, or the caller left mid-check: it never opened
            if self._sessions.release(session):
                self._sessions.left(session.owner, session.id)
            self._unclaim(session.owner, session.id)  # if the store recorded it after all
            raise
        finally:
            session.lock.release()
        return SessionView.of(session)

    async def _only_one_across_replicas(self, session: Session) -> None:
        """A client-chosen id names one session across every replica of the store: one parked
        there, or live on another replica, makes this open ALREADY_EXISTS (the client resumes
        it instead), and the session just opened here goes without a trace. Its holder record
        is written by this check, not in the background (which would overwrite another
        replica's before reading it). With the store down the open stands: ids are unique
        within this server, and its record is written once the store is back."""
        key = store_key(session.owner, session.id)
        try:
            where = await self._store.claim_new(key, self._claim_ttl_ms)
        except StoreUnavailable as exc:
            store_log.warning(
                "store-down-open",
                "opened sessions without checking that their ids are free on other replicas: %s",
                exc,
            )
            self._claim([key])
            return
        if where is None:
            return
        held = "parked in the shared store" if where == "parked" else "live on another replica"
        raise AlreadyExists(
            f"session {session.id} already exists ({held}); resume it, or open one under a new id"
        )

    def _open(
        self, model: LoadedModel, states: list[np.ndarray] | None, session_id: str, owner: str
    ) -> Session:
        """A new session, recorded as held here so other replicas can ask for it."""
        session = self._sessions.open(model, states, session_id, owner)
        self._claim([store_key(owner, session.id)])
        return session

    async def resume_session(self, session_id: str, owner: str = "") -> SessionView:
        """The caller's live session, adopted from the shared store if another replica parked
        it: what a stream's `resume` answers."""
        return SessionView.of(await self._find(session_id, owner))

    async def _find(self, session_id: str, owner: str) -> Session:
        self.check_open()
        return await self._session(session_id, owner)

    async def _session(self, session_id: str, owner: str) -> Session:
        """The owner's session by id, adopting it first if another replica parked it."""
        failed = await self._adopt([session_id], alone=True, owner=owner)
        if session_id in failed:
            raise failed[session_id]
        return self._sessions.get(session_id, owner)

    async def _adopt(
        self, session_ids: list[str], alone: bool, owner: str
    ) -> dict[str, ServingError]:
        """Bring the ids not live here from where they are: a sibling worker of this server,
        else the shared store where another replica parked them. Returns the ids whose
        adoption failed, with the error for their row. A message's live rows never wait for
        the others: only when no row is live here (`alone`) does it wait for a replica parking
        right now."""
        if not self._elsewhere:
            return {}
        missing = self._sessions.adoptable_among(session_ids, owner)
        if not missing:
            return {}
        failed: dict[str, ServingError] = {}
        if self._siblings is not None:
            missing, failed = await self._from_siblings(missing, owner)
        if missing and self._handoff is not None:
            failed.update(
                await self._from_store(missing, alone or len(missing) == len(session_ids), owner)
            )
        if self._siblings is not None and missing:  # found nowhere: perhaps died with a worker
            unknown = [i for i in missing if i not in failed and self._sessions.adoptable(i, owner)]
            for i in self._sessions.lost(unknown, owner) if unknown else ():
                failed[i] = FailedPrecondition(
                    f"session {i} was lost when the worker process "
                    "holding it died; open a new session"
                )
        return failed

    async def _from_siblings(
        self, missing: list[str], owner: str
    ) -> tuple[list[str], dict[str, ServingError]]:
        """Move the owner's sessions here from the workers that hold them; the ids still
        missing, and those a sibling ended (FAILED_PRECONDITION, as if ended here). A session
        busy where it is, or on its way between two other workers, is asked for again until
        --handoff-wait; then it is UNAVAILABLE with a short retry, never reported unknown."""
        deadline = time.monotonic() + self.config.handoff_wait
        pause = MOVE_POLL
        moved: set[str] = set()
        ended: dict[str, str] = {}
        asking = missing
        while True:
            brought, gone, moving = await self._take_from_siblings(asking, owner)
            moved |= brought
            ended.update(gone)
            moving |= self._leaving(asking, owner) - brought
            if not moving or time.monotonic() >= deadline:
                break
            await asyncio.sleep(pause)  # a caller that gives up stops asking here
            pause = min(pause * 2, MOVE_POLL_MAX)
            arrived = {i for i in moving if not self._sessions.adoptable(i, owner)}
            moved |= arrived  # brought here meanwhile (for a call that had given up)
            moving -= arrived
            if not moving:
                break
            asking = sorted(moving)
        failed: dict[str, ServingError] = {
            i: FailedPrecondition(f"session {i} was {why}; open a new session")
            for i, why in ended.items()
        }
        for i in moving - moved - failed.keys():
            failed[i] = Unavailable(
                f"session {i} is busy on another worker of this server; retry",
                retry_after=MOVE_POLL_MAX,
            )
        return [i for i in missing if i not in moved and i not in failed], failed

    def _leaving(self, session_ids: list[str], owner: str) -> set[str]:
        """Those of the ids this worker lent to a sibling and that are not yet settled: on
        their way, so the siblings' answers, read while the session is between two of them,
        may not name it, and the call was told NOT_FOUND (tests/test_workers.py, now and then).
        Not those parked for another replica: those are asked of the store."""
        return {i for i in session_ids if (owner, i) in self._lent}

    async def _take_from_siblings(
        self, session_ids: list[str], owner: str
    ) -> tuple[set[str], dict[str, str], set[str]]:
        """One ask of every sibling: the ids they let go (restored here at once), those they
        ended (with why), and those not free to move now."""
        moved, ended, moving = await self._not_lost(
            self._workers.take(session_ids, owner), self._keep_moved
        )
        return set(moved), ended, moving

    async def _not_lost(
        self, taking: Awaitable[T], keep: Callable[[T], Coroutine[Any, Any, None]]
    ) -> T:
        """`taking`'s answer, after `keep` restored the sessions it took out of a sibling or
        the store. Those exist nowhere else until restored here, so a caller that gives up
        meanwhile (a deadline, a cancelled stream) does not stop that: `keep` then runs when
        the answer comes (300 calls with millisecond deadlines had lost a session within 20).
        Restored in the caller's own turn otherwise, so no sibling can take them back first."""
        answer = asyncio.ensure_future(taking)
        try:
            result = await asyncio.shield(answer)
        except asyncio.CancelledError:
            answer.add_done_callback(self._keep_orphaned(keep))
            raise
        await keep(result)
        return result

    def _keep_orphaned(
        self, keep: Callable[[T], Coroutine[Any, Any, None]]
    ) -> Callable[[asyncio.Future], None]:
        def kept(answer: asyncio.Future) -> None:
            if answer.cancelled() or answer.exception() is not None:
                return  # nothing was taken, or the failure is logged where it happened
            task = asyncio.get_running_loop().create_task(keep(answer.result()))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return kept

    async def _keep_moved(self, answer: Moves) -> None:
        """Restore what siblings let go; give back, to the worker it came from, what this
        worker cannot hold."""
        refused: dict[int, list[ParkedSession]] = {}
        for source, parked in answer[0].values():
            if not self._restore(parked, "moved"):
                refused.setdefault(source, []).append(parked)
        for source, sessions in refused.items():
            for stranded in await self._workers.give_back(source, sessions):
                log.warning(
                    "session %s could be neither held here nor given back to worker "
                    "%d now; it stays lent there, which takes it back",
                    stranded,
                    source,
                )

    async def _keep_adopted(self, adoption: Adoption) -> None:
        """Restore what was taken from the store; park again what this replica cannot hold."""
        refused = [
            parked for parked in adoption.taken.values() if not self._restore(parked, "adopted")
        ]
        if refused:
            await self._give_back(refused)

    async def _from_store(
        self, missing: list[str], wait: bool, owner: str
    ) -> dict[str, ServingError]:
        """Parked sessions, else those another live replica holds: asked to park them now."""
        try:
            adoption = await self._not_lost(
                self._store.adopt(missing, owner, wait), self._keep_adopted
            )
            taken = set(adoption.taken)
            if adoption.held and await self._store.request_release(adoption.held, owner):
                held = [i for ids in adoption.held.values() for i in ids]
                taken.update(
                    (
                        await self._not_lost(
                            self._store.adopt(held, owner, wait=False, expected=True),
                            self._keep_adopted,
                        )
                    ).taken
                )
        except StoreUnavailable as exc:
            error = Unavailable(
                f"{exc}; sessions parked by other replicas cannot be reached now, retry shortly",
                retry_after=1.0,
            )
            return dict.fromkeys(missing, error)
        if wait or len(taken) == len(missing) or not await self._store.parking():
            return {}
        busy = Unavailable(
            "this session may be on its way from a replica that is shutting "
            "down; retry in a moment",
            retry_after=0.2,
        )
        return {i: busy for i in missing if i not in taken}

    def _restore(self, parked: ParkedSession, how: str) -> bool:
        """Make a taken session live here, in the same loop turn as it left the store or its
        sibling; `how` labels the handoff metric (adopted, moved)."""
        try:
            model = self._registry.get(parked.model, parked.version)
            wrong = parked.mismatch([(s.input, s.size) for s in model.spec.states], model.graph)
            if wrong:
                raise ValueError(wrong)  # checked before a slot is taken
            states = [parked.states[s.input] for s in model.spec.states]
            lent = self._lent.pop((parked.owner, parked.session_id), None)
            if lent is not None:  # back before its move was settled: this copy is the newer
                self._sessions.free(lent[0])
            arriving = how in ("moved", "returned")
            if arriving and self._sessions.find(parked.session_id, parked.owner) is not None:
                return True  # taken back here before this copy came: the live one stays
            self._sessions.restore(
                model,
                parked.session_id,
                states,
                parked.steps,
                parked.idle_seconds,
                parked.owner,
                arriving=arriving,
            )
        except (ServingError, ValueError) as exc:
            log.warning(
                "cannot adopt session %s (%s v%d): %s; left for another replica",
                parked.session_id,
                parked.model,
                parked.version,
                exc,
            )
            return False
        self.metrics.handoffs.labels(*model.labels, how).inc()
        self._claim([store_key(parked.owner, parked.session_id)])
        return True

    def _claim(self, session_ids: list[str]) -> None:
        """Record, in the background and batched, that this process holds these sessions, so
        another replica that gets their calls can ask for them (with --state-store)."""
        if self._handoff is None:
            return
        self._claims.extend(session_ids)
        self._flush_soon()

    def _unclaim(self, owner: str, session_id: str) -> None:
        """Drop, in the background and batched, the record of a session that ended here: its
        id is then free for a new session on any replica."""
        self._unclaims.append((owner, session_id))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._claiming is None:
            self._claiming = asyncio.get_running_loop().create_task(self._flush_claims())

    async def _flush_claims(self) -> None:
        try:
            while self._claims or self._unclaims:
                ids, self._claims = self._claims, []
                ended, self._unclaims = self._unclaims, []
                await self._store.claim(ids, self._claim_ttl_ms)
                gone = [(o, i) for o, i in ended if self._sessions.find(i, o) is None]
                await self._store.unclaim([store_key(o, i) for o, i in gone])
                again = [store_key(o, i) for o, i in gone if self._sessions.find(i, o) is not None]
                await self._store.claim(again, self._claim_ttl_ms)  # opened anew meanwhile
        finally:
            self._claiming = None

    async def refresh_claims(self) -> None:
        """Renew the records of every live session before they expire."""
        if self._handoff is not None:
            await self._store.claim(
                [store_key(s.owner, s.id) for s in self._sessions.live()], self._claim_ttl_ms
            )

    async def park_on_request(self, session_ids: list[str], owner: str) -> None:
        """Another replica got calls for these sessions: park them for it (after their
        in-flight steps). If the store fails meanwhile they stay live here."""
        moved, _, _ = await self.release_sessions(session_ids, owner, wait=True)
        if not moved:
            return
        try:
            await self._store.give_back(moved)
        except StoreUnavailable as exc:
            log.warning(
                "could not park %d requested sessions (%s); they stay here", len(moved), exc
            )
            self.take_back(moved)
            return
        for parked in moved:
            self.metrics.handoffs.labels(parked.model, str(parked.version), "released").inc()

    async def release_sessions(
        self, session_ids: list[str], owner: str, wait: bool = False
    ) -> tuple[list[ParkedSession], dict[str, str], list[str]]:
        """Let the owner's sessions among the ids go, with their state; why the others ended
        here, if they did; and which are not free to move now. For a sibling worker (not
        `wait`) a session with steps in flight or waiting here is one of those, as is one
        moved on a moment ago: the sibling asks again. Another replica's request (`wait`)
        takes each after its in-flight steps. Sessions of a retiring version stay (the asker
        cannot serve it)."""
        moved: list[ParkedSession] = []
        ended: dict[str, str] = {}
        moving: list[str] = []
        now = time.monotonic()
        _forget_before(self._moved_away, now - MOVE_WINDOW)
        for session_id in session_ids:
            session = self._sessions.find(session_id, owner)
            if session is None or session.model.retiring:
                reason = self._sessions.ended_reason(session_id, owner)
                if session is None and reason is not None:
                    ended[session_id] = reason
                elif session is None and (
                    (owner, session_id) in self._moved_away or (owner, session_id) in self._lent
                ):
                    moving.append(session_id)  # on its way to another worker: ask there
                continue
            if not session.lock.take():
                if not wait:  # steps of its own here run first; the sibling asks again
                    moving.append(session_id)  # (moving it now would end them unrun)
                    continue
                await session.lock.acquire()
                if self._sessions.ended(session):  # while we waited for its lock
                    session.lock.release()
                    continue
            try:
                claims = self._sessions.claims
                if wait or claims is None:
                    moved.append(_parked(session, self._sessions.clock()))
                    self._sessions.release(session)  # its slot is free from here
                    if wait:  # for another replica, through the store: no longer the server's
                        self._sessions.left(owner, session_id)
                else:  # to a sibling: kept until the move is settled (_settle_lent)
                    try:
                        claims.lend(owner, session_id)
                    except ServingError:
                        moving.append(session_id)  # the table failed: it stays, ask again
                        continue
                    moved.append(_parked(session, self._sessions.clock()))
                    self._sessions.lend(session)
                    displaced = self._lent.pop((owner, session_id), None)
                    if displaced is not None:
                        self._sessions.free(displaced[0])
                    self._lent[(owner, session_id)] = (session, now)
                self._moved_away[(owner, session_id)] = now
                self._moved_away.move_to_end((owner, session_id))
            finally:
                session.lock.release()
        return moved, ended, moving

    def take_back(self, sessions: list[ParkedSession]) -> list[str]:
        """Sessions this worker released that their asker could not hold: live here again."""
        return [p.session_id for p in sessions if not self._restore(p, "returned")]

    async def _give_back(self, refused: list[ParkedSession]) -> None:
        try:
            await self._store.give_back(refused)
        except StoreUnavailable as exc:  # the store failed between taking and giving back
            log.error(
                "LOST %d sessions taken from the shared store that this replica could "
                "not serve and could not park again: %s",
                len(refused),
                exc,
            )
            self.metrics.lost.labels("store").inc(len(refused))

    async def hand_off(self) -> int:
        """On drain: once in-flight steps are done, park every session in the shared store.
        Raises StoreUnavailable (the sessions stay live here) if the store cannot take them."""
        if self._handoff is None:
            return 0
        await self._store.announce_parking()
        live = self._sessions.live()
        async with Holding(live):
            now = self._sessions.clock()
            parked = [_parked(s, now) for s in live]
            await self._store.park(parked)
            for session in live:
                self._sessions.close(session, "handed off to another replica")
                self.metrics.handoffs.labels(*session.model.labels, "parked").inc()
        return len(parked)

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
                await self._adopt(session_ids, alone=False, owner=owner) if self._elsewhere else {}
            )  # no coroutine on the common path
            group = None if failed else self._steps.group(session_ids, owner)
        if group is not None and group.takes(x):
            outcome = await self._steps.advance(group, x)
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
            outcome = await self._steps.advance(self._steps.one(session), x, plan)
            if outcome.errors:
                raise cast(ServingError, outcome.errors[0].cause)
            # Under no lock, but with no await since the step: nothing came between.
            current = _states_of(session) if with_states else None
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
            states = _states_of(session)
            session.last_used = self._sessions.clock()
            return SessionView.of(session), states

    async def close_session(self, session_id: str, owner: str = "") -> SessionView:
        session = await self._session(session_id, owner)
        async with session.lock:
            view = SessionView.of(session)  # before its slot goes back to the store
            self._sessions.close(session, "closed by its client")
            return view
