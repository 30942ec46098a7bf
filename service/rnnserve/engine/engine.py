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
from rnnserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from rnnserve.models.contract import ModelSpec
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.logs import Throttled
from rnnserve.ops.metrics import Metrics
from rnnserve.state.memory import FLOAT, MESSAGE_COPIES, MemoryBudget, Reservation, RunCost
from rnnserve.state.session_lock import SessionLock, all_free, release_all, take_all
from rnnserve.state.sessions import Session, SessionTable

log = logging.getLogger(__name__)
T = TypeVar("T")
store_log = Throttled(__name__)
"""The store's outages: one line per cause a minute, not one per call."""
MESSAGE_OVERHEAD = 1024
ROW_OVERHEAD = 16
"""Room in a response for its framing and names, and per row for its step count and framing."""
UNKNOWN_MODEL = "(unknown)"
GROUP_ROW_BYTES = 32
"""A kept SessionGroup's bytes per row: a pointer in each of three lists, and an int64 slot."""
MOVE_WINDOW = 2.0
"""Seconds a session that moved to a sibling is said to be on its way (its asker restores it
within milliseconds): a third worker asking meanwhile asks again instead of answering NOT_FOUND
or "ended before this step ran", as it did for clients stepping the same sessions through
several workers (tests/test_workers.py)."""
LEND_TIMEOUT = MOVE_CALL_TIMEOUT + 1.0
"""Seconds after which a session let go to a sibling has arrived there or never will: the
sibling's call has passed its deadline."""
ROWS_PER_TURN = 1024
"""Rows of a message resolved one by one (some are not live here) between two turns of the event
loop: a message of thousands of unknown ids must not hold up every other call on this worker for
its whole length (another client's p99 under such messages: bench/unknown_ids.py)."""
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
class RowError:
    row: int
    code: str
    message: str
    retry_after: float | None = None
    """As the error's own: when the same row may succeed if sent again."""

    @classmethod
    def of(cls, row: int, error: ServingError) -> RowError:
        return cls(row, error.code, str(error), error.retry_after)


@dataclass(frozen=True)
class StepOutcome:
    y: np.ndarray
    """[rows, k, outputs]; NaN in failed rows."""
    steps: list[int]
    errors: list[RowError]
    labels: tuple[str, str] | None
    """The first live row's model and version (rows may span models); None if none is live."""


@dataclass(frozen=True)
class SequenceStep:
    y: np.ndarray
    states: dict[str, np.ndarray] | None
    """The states after the step, by input name, when asked for."""


class SessionGroup:
    """A message's rows found to be distinct live sessions of one owner and one model, with
    what a step of all of them needs. It stays true while no session of this process has
    ended since (`SessionTable.removals` unchanged), so a stream that names the same sessions
    message after message (a gateway multiplexing its users) has them looked up once."""

    __slots__ = ("ids", "owner", "model", "sessions", "locks", "slots", "removals")

    def __init__(
        self, owner: str, model: LoadedModel, sessions: list[Session], removals: int
    ) -> None:
        self.ids = [s.id for s in sessions]  # the sessions' own strings: no copies kept
        self.owner = owner
        self.model = model
        self.sessions = sessions
        self.locks = [s.lock for s in sessions]
        self.slots = np.array([s.slot for s in sessions], np.int64)
        self.removals = removals

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
        """x fits the model, and is finite (else `_resolve` names the rows that are not)."""
        return self.model.spec.features == x.shape[2] and bool(np.isfinite(x).all())


class StepMemo:
    """What one stream's last step resolved; the stream hands it to every `Engine.step`, and
    to `Engine.forget` when it ends. A group is kept only while the memory budget holds its
    `nbytes` (2,048 streams each keeping 10,000 sessions would be 650 MiB)."""

    __slots__ = ("group",)

    def __init__(self) -> None:
        self.group: SessionGroup | None = None


class _Locked:
    """Hold several sessions' locks. When all are free they are taken at once, in this event
    loop turn, with no await; otherwise one by one in id order, so two callers cannot
    deadlock."""

    __slots__ = ("sessions", "all", "locks")

    def __init__(self, sessions: list[Session], locks: list[SessionLock] | None = None) -> None:
        self.sessions = sessions
        self.all = locks
        """The sessions' locks in their order, when the caller has them already."""

    async def __aenter__(self) -> None:
        locks = self.all if self.all is not None else [s.lock for s in self.sessions]
        if take_all(locks):
            self.locks = locks
            return
        self.locks = [s.lock for s in sorted(self.sessions, key=lambda s: s.id)]
        held = 0
        try:
            for lock in self.locks:
                await lock.acquire()
                held += 1
        except BaseException:  # cancelled while waiting: give back what was taken
            for lock in self.locks[:held]:
                lock.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        release_all(self.locks)


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


def _run_error(model: LoadedModel, exc: BaseException) -> ServingError:
    """What the rows of a failed run are told (the log has the exception)."""
    return (
        exc
        if isinstance(exc, ServingError)
        else ServingError(
            f"the run of {model.spec.name} v{model.spec.version} failed; the server log has the "
            "details"
        )
    )


async def _in_spans(
    run: Callable[[np.ndarray], Awaitable[np.ndarray]], x: np.ndarray, span: int
) -> np.ndarray:
    """y for x [rows, k, features] from runs of at most `span` timesteps, one after another
    (the state carried between them), joined along time."""
    if span >= x.shape[1]:
        return await run(x)
    return np.concatenate(
        [await run(np.ascontiguousarray(x[:, t : t + span])) for t in range(0, x.shape[1], span)],
        axis=1,
    )


def _first_labels(sessions: list[Session | None]) -> tuple[str, str] | None:
    return next((s.model.labels for s in sessions if s is not None), None)


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

    def _answer_bytes(self, model: LoadedModel, rows: int, steps: int, states: bool) -> int:
        """The response's size, refused up front when it would exceed the message limit."""
        spec = model.spec
        nbytes = (
            FLOAT
            * rows
            * (steps * spec.outputs + (sum(s.size for s in spec.states) if states else 0))
        )
        if nbytes + MESSAGE_OVERHEAD + ROW_OVERHEAD * rows > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"the answer would be {nbytes:,} bytes, over the {self.config.max_message_bytes:,}"
                "-byte message limit (--max-message-bytes): send fewer rows or timesteps per "
                "call"
                + (
                    ", or ask for the last step only (OUTPUT_MODE_LAST_STEP)"
                    if steps > 1 and states
                    else ""
                )
            )
        return nbytes

    def _predict_plan(
        self, model: LoadedModel, x: np.ndarray, last_only: bool
    ) -> tuple[int, Reservation]:
        """Rows per run, and the reservation for the whole call: its messages plus one run."""
        rows, time = x.shape[:2]
        answer = self._answer_bytes(model, rows, 1 if last_only else time, states=True)
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
            return await model.batcher.predict(x, states)
        return await self._predict_ragged(model, x, lens, states)

    async def _predict_ragged(
        self, model: LoadedModel, x: np.ndarray, lens: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Sequences of each length run as their own group: exact, no padded steps in the state."""
        groups = [np.flatnonzero(lens == n) for n in np.unique(lens)]
        results = await asyncio.gather(
            *(  # every group ends before the call (and its memory)
                model.batcher.predict(
                    np.ascontiguousarray(x[idx, : lens[idx[0]]]), [s[idx] for s in states]
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
        async with _Locked(live):
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
                self.forget(memo)
            failed = (
                await self._adopt(session_ids, alone=False, owner=owner) if self._elsewhere else {}
            )  # no coroutine on the common path
            group = None if failed else self._group(session_ids, owner)
        if group is not None and group.takes(x):
            outcome = await self._step_group(group, x)
            if fresh and memo is not None:  # after the step: it never waits for the memo
                self._remember(memo, group)
            return outcome
        sessions, errors, cost = await self._resolve(session_ids, x, owner, failed)
        valid = [s for s in sessions if s is not None]
        if not valid:
            return StepOutcome(
                np.full((*x.shape[:2], 0), np.nan, np.float32), [0] * len(sessions), errors, None
            )
        outputs = valid[0].model.spec.outputs
        span, reserve = self._steps_plan(valid[0].model, x, cost)
        async with reserve, _Locked(valid):
            y = await self._run_steps(sessions, x, errors, outputs, span)
        steps = [s.steps if s is not None else 0 for s in sessions]
        if errors:
            errors.sort(key=lambda e: e.row)
        return StepOutcome(y, steps, errors, _first_labels(sessions))

    def _group(self, session_ids: list[str], owner: str) -> SessionGroup | None:
        """The common message's rows, proved fine without a Python loop over them: every id a
        distinct live session of the caller's, all of one model. None sends the message the
        row-by-row way (`_resolve`), which says what is wrong with which row. Multiplexed, the
        row-by-row way costs about ten times this one per session-step (docs/benchmarks.md)."""
        sessions = self._sessions.all_owned(session_ids, owner)
        if sessions is None or len(set(session_ids)) != len(session_ids):
            return None
        models = {s.model for s in sessions}
        if len(models) != 1:
            return None
        return SessionGroup(owner, models.pop(), sessions, self._sessions.removals)

    def _remember(self, memo: StepMemo, group: SessionGroup) -> None:
        """Keep `group` for the stream's next message, if the memory budget has room now."""
        if self.budget.hold(group.nbytes):
            memo.group = group

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
        if memo.group is not None:
            self.budget.release(memo.group.nbytes)
            memo.group = None

    async def _step_group(self, group: SessionGroup, x: np.ndarray) -> StepOutcome:
        """`step` for a message whose rows are a `SessionGroup`: one run, no per-row
        bookkeeping unless a session ended while the message waited for memory or locks."""
        model, sessions, slots = group.model, group.sessions, group.slots
        rows = len(sessions)
        cost = RunCost(model.cost.per_step * rows, model.cost.per_row * rows)
        span, reserve = self._steps_plan(model, x, cost)
        if self._sessions.removals == group.removals:
            try:
                y = self._run_now(model, slots, group.locks, x, span, reserve)
            except Exception as exc:
                return self._group_failed(model, slots, x, exc)
            if y is not None:
                return self._group_stepped(model, slots, y)
        async with reserve, _Locked(sessions, group.locks):
            if self._sessions.removals != group.removals:  # something ended: row by row
                errors: list[RowError] = []
                live: list[Session | None] = list(sessions)
                y = await self._run_steps(live, x, errors, model.spec.outputs, span)
                steps = [s.steps if s is not None else 0 for s in live]
                errors.sort(key=lambda e: e.row)
                return StepOutcome(y, steps, errors, _first_labels(live))
            try:
                y = await _in_spans(lambda part: model.batcher.step(slots, part), x, span)
            except Exception as exc:  # CancelledError passes: the caller left
                return self._group_failed(model, slots, x, exc)
            return self._group_stepped(model, slots, y)

    def _run_now(
        self,
        model: LoadedModel,
        slots: np.ndarray | list[int],
        locks: list[SessionLock],
        x: np.ndarray,
        span: int,
        reserve: Reservation,
    ) -> np.ndarray | None:
        """y of a step of these sessions run at once, on the event loop, when nothing has to
        be waited for: the memory is there, every lock is free, the run is one span and the
        batcher is idle and rates it short. None sends the step the general way (reservation,
        locks, batcher). Nothing awaits between these checks and the commit, so no other work
        can come between them: the locks and the reservation need to be free, not taken and
        given back. A stream's step then skips five coroutines and the taking and giving back
        of its locks (what that saves: docs/benchmarks.md). A failed run raises, its sessions
        as they were."""
        if span < x.shape[1] or not self.budget.fits(reserve.nbytes) or not all_free(locks):
            return None
        return model.batcher.step_now(slots, x)

    def _group_stepped(self, model: LoadedModel, slots: np.ndarray, y: np.ndarray) -> StepOutcome:
        model.store.touch(slots, self._sessions.clock())
        return StepOutcome(y, model.store.step_counts(slots), [], model.labels)

    @staticmethod
    def _group_failed(
        model: LoadedModel, slots: np.ndarray, x: np.ndarray, exc: Exception
    ) -> StepOutcome:
        """A group's failed run: every row's error, each session as it was."""
        error = _run_error(model, exc)
        return StepOutcome(
            np.full((*x.shape[:2], model.spec.outputs), np.nan, np.float32),
            model.store.step_counts(slots),
            [RowError.of(r, error) for r in range(len(slots))],
            None,
        )

    def _steps_plan(
        self, first: LoadedModel, x: np.ndarray, cost: RunCost
    ) -> tuple[int, Reservation]:
        """Timesteps per run (long messages run in spans, the state carried between them, which
        is exact), and the reservation for the whole message: its messages plus one span."""
        rows, k = x.shape[:2]
        answer = self._answer_bytes(first, rows, k, states=False)
        self.budget.check_run(
            cost.run(1, 1), f"one timestep of {rows} sessions", "send fewer sessions per message"
        )
        span = min(k, max(1, (self.budget.chunk - cost.per_row) // cost.per_step))
        total = MESSAGE_COPIES * answer + 2 * x.nbytes + cost.run(1, span)
        return span, self.budget.reserve(
            total,
            f"a step of {rows} sessions x {k} timesteps",
            "send fewer sessions or timesteps per message",
        )

    async def _resolve(
        self,
        session_ids: list[str],
        x: np.ndarray,
        owner: str,
        failed: dict[str, ServingError],
    ) -> tuple[list[Session | None], list[RowError], RunCost]:
        """Each row's session or error, and the run cost of all live rows taken together,
        letting other calls run every ROWS_PER_TURN rows."""
        # One check of the whole on the common path; rows are told apart only when one is off.
        # (np.isfinite: a sum would need np.errstate against overflow, which costs more.)
        finite = np.isfinite(x)
        bad_values = None if finite.all() else ~finite.all(axis=(1, 2))
        sessions: list[Session | None] = []
        errors: list[RowError] = []
        seen: set[str] = set()
        outputs = None
        per_step = per_row = 0
        for row, session_id in enumerate(session_ids):
            if row and not row % ROWS_PER_TURN:
                await asyncio.sleep(0)  # sessions that end meanwhile are caught under the locks
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
                per_step += session.model.cost.per_step
                per_row += session.model.cost.per_row
            except ServingError as exc:
                sessions.append(None)
                errors.append(RowError.of(row, exc))
        return sessions, errors, RunCost(per_step, per_row)

    async def _run_steps(
        self,
        sessions: list[Session | None],
        x: np.ndarray,
        errors: list[RowError],
        outputs: int,
        span: int,
    ) -> np.ndarray:
        """y [rows, k, outputs] for the live rows' sessions, NaN where a row failed; `span`
        timesteps per run."""
        groups: dict[LoadedModel, list[int]] = {}
        for row, session in enumerate(sessions):
            if session is None:
                continue
            if self._sessions.ended(session):  # closed or evicted while we waited for its lock
                sessions[row] = None
                errors.append(
                    RowError(
                        row,
                        FailedPrecondition.code,
                        f"session {session.id} ended before this step ran",
                    )
                )
                continue
            groups.setdefault(session.model, []).append(row)
        y = await _in_spans(
            lambda part: self._run_span(groups, sessions, part, outputs, errors), x, span
        )
        now = self._sessions.clock()
        for rows in groups.values():
            for r in rows:
                cast(Session, sessions[r]).last_used = now  # a row of `groups` is live
        return y

    async def _run_span(
        self,
        groups: dict[LoadedModel, list[int]],
        sessions: list[Session | None],
        x: np.ndarray,
        outputs: int,
        errors: list[RowError],
    ) -> np.ndarray:
        """One run per model. A model whose run fails fails only its own rows (their sessions
        unchanged, see Batcher._finish); they leave `groups` and `sessions` for later spans."""
        if not groups:  # every row failed or ended
            return np.full((*x.shape[:2], outputs), np.nan, np.float32)
        whole = len(groups) == 1 and len(next(iter(groups.values()))) == len(x)
        live = cast(list[Session], sessions)  # the rows of `groups` are live
        coros = [
            model.batcher.step([live[r].slot for r in rows], x if whole else x[rows])
            for model, rows in groups.items()
        ]
        results: list[np.ndarray | BaseException]
        if len(coros) == 1:
            try:
                results = [await coros[0]]
            except Exception as exc:  # CancelledError passes: the caller left
                results = [exc]
        else:
            results = await asyncio.gather(*coros, return_exceptions=True)
        if whole and not isinstance(results[0], BaseException):
            return results[0]
        y = np.full((*x.shape[:2], outputs), np.nan, np.float32)
        for (model, rows), result in zip(list(groups.items()), results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                error = _run_error(model, result)
                errors.extend(RowError.of(r, error) for r in rows)
                for r in rows:
                    sessions[r] = None
                del groups[model]
                continue
            y[rows] = result
        return y

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
        span, reserve = self._steps_plan(model, x, model.cost)
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
            y = self._step_one_now(session, x, span, reserve)
            if y is not None:
                return self._sequence_stepped(session, y, with_states, end)
            async with reserve, session.lock:
                y = await self._step_one(session, x, span)
                return self._sequence_stepped(session, y, with_states, end)
        except BaseException:
            if start:
                self._sessions.close(session, "failed on its first step")
            raise

    def _sequence_stepped(
        self, session: Session, y: np.ndarray, with_states: bool, end: bool
    ) -> SequenceStep:
        """What a sequence step answers, taken before an `end` lets the session go."""
        current = _states_of(session) if with_states else None
        if end:
            self._sessions.close(session, "ended by sequence_end")
        return SequenceStep(y, current)

    def _step_one_now(
        self, session: Session, x: np.ndarray, span: int, reserve: Reservation
    ) -> np.ndarray | None:
        """`_step_one` run at once when it can be (see `_run_now`), else None."""
        model = session.model
        if self._sessions.ended(session):
            return None  # `_step_one` says so
        try:
            y = self._run_now(model, [session.slot], [session.lock], x, span, reserve)
        except Exception as exc:
            raise _run_error(model, exc) from exc
        if y is not None:
            session.last_used = self._sessions.clock()
        return y

    async def _step_one(self, session: Session, x: np.ndarray, span: int) -> np.ndarray:
        """One session's steps, its lock held: FAILED_PRECONDITION if it ended while the caller
        waited for the lock, the run's error if the run failed (the session as it was)."""
        if self._sessions.ended(session):
            raise FailedPrecondition(f"session {session.id} ended before this step ran")
        model = session.model
        try:
            y = await _in_spans(lambda part: model.batcher.step([session.slot], part), x, span)
        except ServingError:
            raise
        except Exception as exc:  # CancelledError passes: the caller left
            raise _run_error(model, exc) from exc
        session.last_used = self._sessions.clock()
        return y

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
