"""Sessions between processes: bringing a session that is not live here from a sibling worker
or from the shared store, letting sessions go to them, the holder records other replicas ask,
and the drain's handoff.

The engine holds one `SessionMoves` and calls it where a call names a session that is not live
here (`adopt`); the cluster's servers (siblings' requests, other replicas' release requests)
and the server's drain call it directly. Where sessions go is behind the `SiblingWorkers` and
`SharedStore` protocols (sources.py), so nothing here knows gRPC or Redis.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, TypeVar

import numpy as np

from rnnserve.engine.registry import ModelRegistry
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
from rnnserve.errors import AlreadyExists, FailedPrecondition, ServingError, Unavailable
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.logs import Throttled
from rnnserve.ops.metrics import Metrics
from rnnserve.state.session_lock import Holding
from rnnserve.state.sessions import Session, SessionTable

log = logging.getLogger(__name__)
T = TypeVar("T")
store_log = Throttled(__name__)
"""The store's outages: one line per cause a minute, not one per call."""
MOVE_WINDOW = 2.0
"""Seconds a session that moved to a sibling is said to be on its way (its asker restores it
within milliseconds): a third worker asking meanwhile asks again instead of answering NOT_FOUND
or "ended before this step ran", as it did for clients stepping the same sessions through
several workers (tests/test_workers.py)."""
LEND_TIMEOUT = MOVE_CALL_TIMEOUT + 1.0
"""Seconds after which a session let go to a sibling has arrived there or never will: the
sibling's call has passed its deadline."""
ROOM_SHARE = 32
"""make_room spills at least 1/ROOM_SHARE of --max-sessions at a time."""
MOVE_POLL = 0.002
MOVE_POLL_MAX = 0.05
"""Seconds between asks for a session that is busy elsewhere or on its way: doubling from the
first to the last."""


def states_of(session: Session) -> dict[str, np.ndarray]:
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
        states_of(session),
        session.model.graph,
    )


def _forget_before(times: OrderedDict, cutoff: float) -> None:
    """Drop the entries older than `cutoff` from a map kept in the order of its times."""
    while times and next(iter(times.values())) < cutoff:
        times.popitem(last=False)


class SessionMoves:
    """Where sessions not live in this process come from and go to: sibling workers (with
    --workers) and other replicas through the shared store (with --state-store)."""

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        sessions: SessionTable,
        handoff: SharedStore | None,
        siblings: SiblingWorkers | None,
    ) -> None:
        self.config = config
        self._registry = registry
        self._sessions = sessions
        self._handoff = handoff
        self._siblings = siblings
        self.elsewhere = handoff is not None or siblings is not None
        """Sessions not live here may be held by a sibling worker or another replica."""
        self.shared = handoff is not None
        """Sessions outlive this process in the shared store (--state-store)."""
        self.spilling = handoff is not None and config.session_ttl > 0
        """Idle sessions leave memory for the store and come back on their next call."""
        self._claims: list[str] = []
        self._unclaims: list[tuple[str, str]] = []
        self._claiming: asyncio.Task | None = None
        if handoff is not None:
            sessions.on_end = self.unclaim
        self._moved_away: OrderedDict[tuple[str, str], float] = OrderedDict()
        """(owner, id) of sessions released to a sibling in the last MOVE_WINDOW, by when."""
        self._lent: dict[tuple[str, str], tuple[Session, float]] = {}
        """Sessions let go to a sibling, their slots kept until the move is settled."""
        self._background: set[asyncio.Task] = set()
        """Give-backs of sessions that arrived for callers that had given up, and spills."""
        self._parking_now: set[tuple[str, str]] = set()
        """(owner, id) of sessions released here whose store write has not returned: still
        the server's in its shared table, live nowhere."""
        self._spilling = asyncio.Lock()
        self._handing_off = False
        """The drain parks every session: no spill sets or ends a parking mark meanwhile."""
        self._claim_ttl_ms = int(2 * config.session_idle_timeout * 1000)
        self.metrics: Metrics = registry.metrics

    def settle(self, now: float) -> set[tuple[str, str]]:
        """The idle sweep's part: forget old moves, settle sessions lent to siblings; the
        (owner, id) of sessions on their way, which the shared table may still name here."""
        _forget_before(self._moved_away, now - MOVE_WINDOW)
        self._settle_lent(now)
        return self._moved_away.keys() | self._lent.keys() | self._parking_now

    async def close(self) -> None:
        self._handing_off = True
        async with self._spilling:  # a spill under way writes before the store closes
            if self._handoff is not None:
                await self._handoff.close()
        if self._siblings is not None:
            await self._siblings.close()

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

    async def only_one_across_replicas(self, session: Session) -> None:
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
            self.claim([key])
            return
        if where is None:
            return
        held = "parked in the shared store" if where == "parked" else "live on another replica"
        raise AlreadyExists(
            f"session {session.id} already exists ({held}); resume it, or open one under a new id"
        )

    async def adopt(
        self, session_ids: list[str], alone: bool, owner: str
    ) -> dict[str, ServingError]:
        """Bring the ids not live here from where they are: a sibling worker of this server,
        else the shared store where another replica parked them. Returns the ids whose
        adoption failed, with the error for their row. A message's live rows never wait for
        the others: only when no row is live here (`alone`) does it wait for a replica parking
        right now."""
        if not self.elsewhere:
            return {}
        missing = self._sessions.adoptable_among(session_ids, owner)
        if not missing:
            return {}
        await self.make_room(len(missing), keep=session_ids)
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
            if moving and self.spilling:
                parked = await self._parked_since(sorted(moving), owner)
                moved |= parked
                moving -= parked
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

    async def _parked_since(self, session_ids: list[str], owner: str) -> set[str]:
        """Those of the ids a sibling called on their way that are parked in the store: a
        session moved between workers a moment ago and spilled by its new holder since is not
        on its way any more (only a session no process holds is parked); adopted here."""
        try:
            adoption = await self._not_lost(
                self._store.adopt(session_ids, owner, wait=False),
                self._keep_adopted,
            )
        except StoreUnavailable:
            return set()
        return set(adoption.taken)

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
            if not self.restore(parked, "moved"):
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
            parked for parked in adoption.taken.values() if not self.restore(parked, "adopted")
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
            unreadable: dict[str, ServingError] = {
                i: FailedPrecondition(
                    f"session {i} was in the state store, but its record is unreadable "
                    f"({why}), so it is lost; open a new session"
                )
                for i, why in adoption.unreadable.items()
            }
            if unreadable:
                self.metrics.lost.labels("store").inc(len(unreadable))
            taken = set(adoption.taken) | unreadable.keys()
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
            return unreadable
        busy = Unavailable(
            "this session may be on its way from a replica that is shutting "
            "down; retry in a moment",
            retry_after=0.2,
        )
        return {**unreadable, **{i: busy for i in missing if i not in taken}}

    def restore(self, parked: ParkedSession, how: str) -> bool:
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
                # a call brought it here: spilled again first, it would miss that call's step
                0.0 if self.spilling and how == "adopted" else parked.idle_seconds,
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
        self.claim([store_key(parked.owner, parked.session_id)])
        return True

    def claim(self, session_ids: list[str]) -> None:
        """Record, in the background and batched, that this process holds these sessions, so
        another replica that gets their calls can ask for them (with --state-store)."""
        if self._handoff is None:
            return
        self._claims.extend(session_ids)
        self._flush_soon()

    def unclaim(self, owner: str, session_id: str) -> None:
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
        await self._park(session_ids, owner, "released", "requested")

    async def spill_idle(self) -> int:
        """With --session-ttl: sessions idle past --session-idle-timeout leave memory for the
        store, where their next call finds them (`adopt`) and brings them back exactly. While
        they are on their way, this process is marked parking, so such a call waits for them
        rather than missing them. If the store fails they stay live here and are tried again
        at the next sweep. How many left."""
        if not self.spilling:
            return 0
        limit = self._sessions.clock() - self.config.session_idle_timeout
        idle: dict[str, list[str]] = {}
        for s in self._sessions.live():
            if s.last_used < limit and not s.lock.locked():
                idle.setdefault(s.owner, []).append(s.id)
        return await self._spill(idle, limit) if idle else 0

    async def make_room(self, needed: int, keep: Collection[str] = ()) -> None:
        """With --session-ttl, --max-sessions bounds only the sessions in memory: when `needed`
        more would not fit, the least recently used (none stepping, none of `keep`, the ids of
        the call that needs the room) are spilled to the store first. A batch of at least
        1/ROOM_SHARE of the table at a time, so that a run of new sessions spills at every
        ROOM_SHARE-th open, not at each. If the store fails, the call that needed the room
        gets RESOURCE_EXHAUSTED as without a store."""
        if not self.spilling:
            return
        table = self._sessions
        short = len(table) + needed - table.max_sessions
        if short <= 0:
            return
        candidates = [s for s in table.live() if s.id not in keep and not s.lock.locked()]
        chosen = heapq.nsmallest(
            max(short, table.max_sessions // ROOM_SHARE), candidates, key=lambda s: s.last_used
        )
        if not chosen:
            return
        by_owner: dict[str, list[str]] = {}
        for s in chosen:
            by_owner.setdefault(s.owner, []).append(s.id)
        used_since = max(s.last_used for s in chosen) + 1e-9
        await self._spill(by_owner, used_since)

    async def _spill(self, by_owner: dict[str, list[str]], idle_before: float) -> int:
        """Park these sessions (those used since `idle_before`, or stepping now, stay) in a
        task of this object's own: once a session leaves the table its only copy is on its
        way to the store, so the caller's cancellation (a deadline, a cancelled stream) must
        not stop the write. Spills run one at a time, and none while the drain hands off."""
        task = asyncio.get_running_loop().create_task(self._spill_now(by_owner, idle_before))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    async def _spill_now(self, by_owner: dict[str, list[str]], idle_before: float) -> int:
        async with self._spilling:  # one parking mark, set and ended by one spill at a time
            if self._handing_off:
                return 0
            try:
                await self._store.announce_parking()
            except StoreUnavailable as exc:
                log.warning("sessions stay in memory: %s", exc)
                return 0
            spilled = 0
            for owner, ids in by_owner.items():
                spilled += await self._park(ids, owner, "spilled", "idle", idle_before)
            try:
                await self._store.park([])  # ends the parking mark
            except StoreUnavailable:
                pass  # the mark expires by itself
            return spilled

    async def _park(
        self,
        session_ids: list[str],
        owner: str,
        how: str,
        why: str,
        idle_before: float | None = None,
    ) -> int:
        """Release these sessions (after their in-flight steps; with `idle_before`, only those
        free and unused since) into the store; if the store fails, live here again. They leave
        the server's shared table only once the store has them. How many were parked; `how`
        labels the handoff metric."""
        moved, _, _ = await self.release_sessions(
            session_ids, owner, wait=True, idle_before=idle_before
        )
        if not moved:
            return 0
        on_the_way = {(p.owner, p.session_id) for p in moved}
        self._parking_now |= on_the_way
        try:
            await self._store.give_back(moved)
        except StoreUnavailable as exc:
            log.warning("could not park %d %s sessions (%s); they stay here", len(moved), why, exc)
            for parked in moved:  # out of the table, so that taking it back enters it again
                self._left(parked)
            stranded = self.take_back(moved)
            if stranded:  # their slots were taken meanwhile, and the store refused them
                log.error("LOST %d sessions that could be neither parked nor kept", len(stranded))
                self.metrics.lost.labels("store").inc(len(stranded))
            return 0
        finally:
            self._parking_now -= on_the_way
        for parked in moved:
            self._left(parked)
            self.metrics.handoffs.labels(parked.model, str(parked.version), how).inc()
        return len(moved)

    def _left(self, parked: ParkedSession) -> None:
        """The session left the server: its row of the workers' shared table goes."""
        try:
            self._sessions.left(parked.owner, parked.session_id)
        except ServingError as exc:  # the table failed: the row names a session not here
            log.warning("session %s left, but the shared table failed: %s", parked.session_id, exc)

    async def release_sessions(
        self,
        session_ids: list[str],
        owner: str,
        wait: bool = False,
        idle_before: float | None = None,
    ) -> tuple[list[ParkedSession], dict[str, str], list[str]]:
        """Let the owner's sessions among the ids go, with their state; why the others ended
        here, if they did; and which are not free to move now. For a sibling worker (not
        `wait`) a session with steps in flight or waiting here is one of those, as is one
        moved on a moment ago: the sibling asks again. Another replica's request (`wait`)
        takes each after its in-flight steps. Sessions of a retiring version stay (the asker
        cannot serve it). With `idle_before`, a session used since then (its lock held,
        `last_used` is its latest step's) stays."""
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
                if idle_before is not None:
                    continue  # stepping now: not idle, and never waited for
                if not wait:  # steps of its own here run first; the sibling asks again
                    moving.append(session_id)  # (moving it now would end them unrun)
                    continue
                await session.lock.acquire()
                if self._sessions.ended(session):  # while we waited for its lock
                    session.lock.release()
                    continue
            if idle_before is not None and session.last_used >= idle_before:
                session.lock.release()  # stepped since the sweep looked: not idle
                continue
            try:
                claims = self._sessions.claims
                if wait or claims is None:
                    moved.append(_parked(session, self._sessions.clock()))
                    self._sessions.release(session)  # its slot is free from here
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
        return [p.session_id for p in sessions if not self.restore(p, "returned")]

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
        self._handing_off = True  # no spill starts from here
        async with self._spilling:  # and the one under way ends first
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
