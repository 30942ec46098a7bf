"""A session's lock: asyncio.Lock's API and first-come-first-served waiters, plus `take()`, a
synchronous acquire of a free lock.

A message that steps 1,000 idle sessions then takes all their locks without 1,000 awaits (and
without sorting them: taking every lock in one event-loop turn, never holding some while
waiting for others, cannot deadlock). With asyncio.Lock the locks alone cost more per
session-step than the model run (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol


class HeldCount:
    """How many locks of one session table are held now. While none is, `all_free` answers
    without looking at its locks: a message of 1,000 sessions need not loop over them. One
    per table, so per event loop: workers run in one process (as tests do) never share it."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class SessionLock:
    __slots__ = ("held", "_waiters", "count")

    def __init__(self, count: HeldCount) -> None:
        self.held = False
        """Free means no live waiter either: `release` hands the lock to the first one."""
        self._waiters: deque[asyncio.Future] | None = None
        self.count = count
        """Its table's; every lock a message takes at once shares it."""

    def locked(self) -> bool:
        return self.held

    def take(self) -> bool:
        """Acquire now if free; never waits."""
        if self.held:
            return False
        self.held = True
        self.count.held += 1
        return True

    async def acquire(self) -> bool:
        if self.take():
            return True
        if self._waiters is None:
            self._waiters = deque()
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # handed over just as the caller gave up: pass it on
            elif granted in self._waiters:  # `release` drops the cancelled ones it meets
                self._waiters.remove(granted)
            raise
        return True

    def release(self) -> None:
        """Hand the lock to the first waiter still waiting, or free it."""
        if not self.held:
            raise RuntimeError("release of an unlocked SessionLock")
        if not self._hand_over():
            self.held = False
            self.count.held -= 1

    def _hand_over(self) -> bool:
        """Give the held lock to the first waiter still waiting; False if none is."""
        while self._waiters:
            granted = self._waiters.popleft()
            if not granted.done():
                granted.set_result(True)  # it wakes holding the lock
                return True
        return False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def all_free(locks: list[SessionLock]) -> bool:
    """Whether no lock is held (free locks have no waiters); the locks are of one table. Work
    done with no await in between needs only this: no one can take a lock before it ends.
    Plain loops: on CPython 3.11 they beat any(map(attrgetter(...))) about twofold."""
    if not locks or not locks[0].count.held:
        return True
    for lock in locks:
        if lock.held:
            return False
    return True


def take_all(locks: list[SessionLock]) -> bool:
    """Take every lock now, if every one is free (a loop turn with no await); else none. The
    locks are of one table."""
    if not all_free(locks):
        return False
    for lock in locks:
        lock.held = True
    if locks:
        locks[0].count.held += len(locks)
    return True


def release_all(locks: list[SessionLock]) -> None:
    """Release locks of one table, each to its first waiter if it has one."""
    if not locks:
        return
    count = locks[0].count
    count.held -= len(locks)
    for lock in locks:
        if lock._waiters and lock._hand_over():
            count.held += 1  # held on, by the waiter it woke
        else:
            lock.held = False


class Lockable(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def lock(self) -> SessionLock: ...


class Holding:
    """`async with Holding(sessions)`: hold several sessions' locks. When all are free they are
    taken at once, in this event loop turn, with no await; otherwise one by one in id order,
    so two callers cannot deadlock. `locks` are the sessions' locks in their order, when the
    caller has them already."""

    __slots__ = ("sessions", "all", "locks")

    def __init__(
        self, sessions: Sequence[Lockable | None], locks: list[SessionLock] | None = None
    ) -> None:
        self.sessions = sessions
        self.all = locks if locks is not None else [s.lock for s in sessions if s is not None]

    async def __aenter__(self) -> None:
        if take_all(self.all):
            self.locks = self.all
            return
        live = sorted((s for s in self.sessions if s is not None), key=lambda s: s.id)
        self.locks = [s.lock for s in live]
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
