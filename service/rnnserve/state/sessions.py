"""Live sessions: open → step … → close, or idle-out after --session-idle-timeout.

A session's lock serialises its work, so its steps apply in order even when they come from
several streams or unary calls at once. Recently ended ids are remembered, so a late step gets
FAILED_PRECONDITION ("closed", "evicted") instead of a puzzling NOT_FOUND.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from rnnserve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from rnnserve.ops.metrics import Metrics
from rnnserve.state.claims import Claims
from rnnserve.state.session_lock import HeldCount, SessionLock

if TYPE_CHECKING:  # the engine builds models; sessions only hold them
    from rnnserve.engine.registry import LoadedModel

REMEMBER_ENDED = 100_000
SESSION_ID_HEX = 32


_SESSION_ID = re.compile(f"[0-9a-f]{{{SESSION_ID_HEX}}}")
_SESSION_IDS = re.compile(f"(?:[0-9a-f]{{{SESSION_ID_HEX}}}\n)*[0-9a-f]{{{SESSION_ID_HEX}}}")
"""Ids joined by newlines, each well-formed ('$' would also match before a final newline)."""


def is_session_id(text: str) -> bool:
    return _SESSION_ID.fullmatch(text) is not None


def check_session_id(text: str) -> None:
    if not is_session_id(text):
        raise InvalidArgument(f"session id {text!r} is not {SESSION_ID_HEX} lowercase hex digits")


@dataclass(eq=False)
class Session:
    id: str
    model: LoadedModel
    slot: int
    owner: str
    """The client that opened it (its name from --auth-tokens-file; "" without auth)."""
    lock: SessionLock

    @property
    def steps(self) -> int:
        """Timesteps applied since it opened or was reset (kept with the state, in its slot)."""
        return int(self.model.store.steps[self.slot])

    @steps.setter
    def steps(self, value: int) -> None:
        self.model.store.steps[self.slot] = value

    @property
    def last_used(self) -> float:
        """When its last call ran (the table's clock), kept in its slot like `steps`, so a
        message's sessions are all touched in one numpy assignment."""
        return float(self.model.store.used_at[self.slot])

    @last_used.setter
    def last_used(self, value: float) -> None:
        self.model.store.used_at[self.slot] = value


class SessionTable:
    def __init__(
        self,
        max_sessions: int,
        idle_timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        max_per_client: int = 0,
        claims: Claims | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.claims = claims
        """The server's shared table, where workers share a port (claims.py): chosen ids and
        the per-client cap are then checked across all of them."""
        self.max_per_client = max_per_client
        self.on_end: Callable[[str, str], None] | None = None
        """Told (owner, id) of each session that ends here (not of one that moves away): the
        engine then drops its holder record in the shared store."""
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.clock = clock
        self._live: dict[tuple[str, str], Session] = {}
        """Live sessions by (owner, id): ids are each client's own, so no client can name,
        block or probe another's (a chosen id another client holds is simply free here)."""
        self._ended: OrderedDict[tuple[str, str], str] = OrderedDict()
        """Recently ended (owner, id): why."""
        self._per_client: Counter[str] = Counter()
        self._owned: dict[str, dict[str, Session]] = {}
        """Live sessions by owner, then id: a message's sessions are looked up in its caller's
        own table, so each is found and proved the caller's in one lookup."""
        self.locks_held = HeldCount()
        """How many of its sessions' locks are held now (`session_lock.all_free`)."""
        self.removals = 0
        """Counts sessions leaving the table: unchanged across an await, none of a message's
        sessions ended meanwhile."""

    def __len__(self) -> int:
        return len(self._live)

    def open(
        self,
        model: LoadedModel,
        states: list[np.ndarray] | None,
        session_id: str = "",
        owner: str = "",
    ) -> Session:
        """A new session, under the client's id if it chose one (so proxies can route by it)."""
        if session_id:
            check_session_id(session_id)
            if (owner, session_id) in self._live:
                raise AlreadyExists(f"session {session_id} is already open; pick a new random id")
        chosen = bool(session_id)
        session_id = session_id or secrets.token_hex(SESSION_ID_HEX // 2)
        return self._claimed(model, session_id, states, 0, 0.0, owner, chosen)

    def restore(
        self,
        model: LoadedModel,
        session_id: str,
        states: list[np.ndarray],
        steps: int,
        idle_seconds: float,
        owner: str,
        arriving: bool = False,
    ) -> Session:
        """Take over a session another replica handed off, under its own id and owner; or,
        `arriving`, one a sibling worker let go to this one (already the server's)."""
        if arriving:
            session = self._add(model, session_id, states, steps, idle_seconds, owner)
            if self.claims is None:
                return session
            try:  # only once it is live here, so a refusal leaves the row as it was
                arrived = self.claims.arrive(owner, session_id)
            except BaseException:
                self.release(session)
                raise
            if not arrived:
                self.release(session)
                raise FailedPrecondition(
                    f"session {session_id} went back to the worker it came from"
                )
            return session
        return self._claimed(model, session_id, states, steps, idle_seconds, owner, True)

    def _claimed(
        self,
        model: LoadedModel,
        session_id: str,
        states: list[np.ndarray] | None,
        steps: int,
        idle_seconds: float,
        owner: str,
        chosen: bool,
    ) -> Session:
        """A session new to the server: recorded in the shared table first, where there is
        one, so no other worker can open the same id or pass the client's cap meanwhile."""
        if self.claims is None:
            return self._add(model, session_id, states, steps, idle_seconds, owner)
        self.claims.open(owner, session_id, chosen)
        try:
            return self._add(model, session_id, states, steps, idle_seconds, owner)
        except BaseException:
            self.claims.end(owner, session_id)
            raise

    def left(self, owner: str, session_id: str) -> None:
        """A session released here left the server (parked for another replica): no longer
        the server's."""
        if self.claims is not None:
            self.claims.end(owner, session_id)

    def _add(
        self,
        model: LoadedModel,
        session_id: str,
        states: list[np.ndarray] | None,
        steps: int,
        idle_seconds: float,
        owner: str,
    ) -> Session:
        if len(self._live) >= self.max_sessions:
            raise ResourceExhausted(
                f"the server holds its maximum of {self.max_sessions} "
                "sessions; close finished sessions or retry later"
            )
        if self.max_per_client and self._per_client[owner] >= self.max_per_client:
            raise ResourceExhausted(
                f"this client holds its maximum of {self.max_per_client} "
                "sessions (--max-sessions-per-client); close finished ones"
            )
        slot = model.store.allocate()
        if states is not None:
            try:
                model.store.write(slot, states)
            except BaseException:  # states that do not fit: the slot goes back, not astray
                model.store.release(slot)
                raise
        session = Session(session_id, model, slot, owner, SessionLock(self.locks_held))
        session.last_used = self.clock() - idle_seconds
        session.steps = steps
        self._live[(owner, session.id)] = session
        self._owned.setdefault(owner, {})[session.id] = session
        self._per_client[owner] += 1
        self._ended.pop((owner, session_id), None)  # a chosen id may be used again once ended
        model.sessions += 1
        self.metrics.sessions.labels(*model.labels).inc()
        return session

    def adoptable(self, session_id: str, owner: str) -> bool:
        """Well-formed, not live here and not ended here: perhaps parked by another replica."""
        key = (owner, session_id)
        return key not in self._live and key not in self._ended and is_session_id(session_id)

    def adoptable_among(self, session_ids: list[str], owner: str) -> list[str]:
        """The distinct ids of `session_ids` that are `adoptable`, in order. The well-formed
        check is one regex over all of them where all are (the common case), not one call per
        id: a message may name tens of thousands."""
        live, ended = self._live, self._ended
        unknown = [
            i
            for i in dict.fromkeys(session_ids)
            if (owner, i) not in live and (owner, i) not in ended
        ]
        joined = "\n".join(unknown)  # as long as this only if no id holds a newline
        if (
            len(joined) == len(unknown) * (SESSION_ID_HEX + 1) - 1
            and _SESSION_IDS.fullmatch(joined) is not None
        ):
            return unknown
        return [i for i in unknown if is_session_id(i)]

    def lost(self, session_ids: list[str], owner: str) -> list[str]:
        """Those of the owner's ids whose sessions died with another worker of this server."""
        return self.claims.lost(owner, session_ids) if self.claims is not None else []

    def live(self) -> list[Session]:
        return list(self._live.values())

    def get(self, session_id: str, owner: str = "") -> Session:
        """The owner's live session. Another client's session answers exactly like an unknown
        id, so ids cannot be probed."""
        session = self._live.get((owner, session_id))
        if session is not None:
            return session
        check_session_id(session_id)
        ended = self._ended.get((owner, session_id))
        if ended is not None:
            raise FailedPrecondition(f"session {session_id} was {ended}; open a new session")
        raise NotFound(f"no session {session_id} on this server")

    def all_owned(self, session_ids: list[str], owner: str) -> list[Session] | None:
        """The owner's live sessions for the ids, looked up without a Python loop; None if any
        is not one (then `get`, row by row, says which and why)."""
        owned = self._owned.get(owner)
        if owned is None:
            return None
        found = list(map(owned.get, session_ids))
        return cast(list[Session], found) if all(found) else None

    def ended(self, session: Session) -> bool:
        return self._live.get((session.owner, session.id)) is not session

    def close(self, session: Session, reason: str) -> None:
        """End a session; `reason` reads as 'session … was <reason>'."""
        if not self.release(session):
            return
        self.left(session.owner, session.id)
        self._ended[(session.owner, session.id)] = reason
        while len(self._ended) > REMEMBER_ENDED:
            self._ended.popitem(last=False)
        if self.on_end is not None:
            self.on_end(session.owner, session.id)

    def release(self, session: Session) -> bool:
        """Let a session go without ending it (it moves to another replica): its slot is free
        and its id is not remembered as ended, so a later call may bring it back."""
        if not self.lend(session):
            return False
        self.free(session)
        return True

    def lend(self, session: Session) -> bool:
        """Take a session out of the table (no step runs on it here) but keep its slot, and so
        its state and its model, until its move to a sibling is known to have arrived: `free`
        then, or `revive` if it never did."""
        if self._live.pop((session.owner, session.id), None) is None:
            return False
        self.removals += 1
        owned = self._owned[session.owner]
        del owned[session.id]
        if not owned:
            del self._owned[session.owner]
        self._per_client[session.owner] -= 1
        if not self._per_client[session.owner]:
            del self._per_client[session.owner]
        self.metrics.sessions.labels(*session.model.labels).dec()
        return True

    def free(self, session: Session) -> None:
        """Give back a released or lent session's slot (its model may retire once none has
        one)."""
        session.model.store.release(session.slot)
        session.model.sessions -= 1

    def revive(self, session: Session) -> None:
        """A lent session whose move never arrived: live here again, in its own slot."""
        self._live[(session.owner, session.id)] = session
        self._owned.setdefault(session.owner, {})[session.id] = session
        self._per_client[session.owner] += 1
        self.metrics.sessions.labels(*session.model.labels).inc()

    def find(self, session_id: str, owner: str) -> Session | None:
        """The owner's live session by id, or None (for moves between workers)."""
        return self._live.get((owner, session_id))

    def ended_reason(self, session_id: str, owner: str) -> str | None:
        """Why the owner's session ended here, if it did recently."""
        return self._ended.get((owner, session_id))

    def evict_idle(self) -> int:
        """Close sessions idle past the timeout; a session with work in flight is never idle."""
        limit = self.clock() - self.idle_timeout
        idle = [s for s in self._live.values() if s.last_used < limit and not s.lock.locked()]
        for session in idle:
            self.close(session, f"evicted after {self.idle_timeout:g} s idle")
            self.metrics.evictions.labels(*session.model.labels, "idle").inc()
        return len(idle)

    def reconcile(self, moving: Container[tuple[str, str]]) -> int:
        """End the shared table's rows that name this worker, as holder or lender, for sessions
        it neither holds nor is sending to a sibling (`moving`); how many. None, short of a
        bug; without it their ids and the client's cap would stay taken."""
        if self.claims is None:
            return 0
        gone = [key for key in self.claims.here() if key not in self._live and key not in moving]
        for owner, session_id in gone:
            self.claims.end(owner, session_id)
        return len(gone)

    def close_all(self, reason: str) -> None:
        for session in self.live():
            self.close(session, reason)
