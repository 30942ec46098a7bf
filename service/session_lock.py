"""A session's lock: asyncio.Lock's API and first-come-first-served waiters, plus `take()`, a
synchronous acquire of a free lock.

A message that steps 1,000 idle sessions then takes all their locks without 1,000 awaits (and
without sorting them: taking every lock in one event-loop turn, never holding some while
waiting for others, cannot deadlock). With asyncio.Lock the locks alone cost ~0.6 µs per
session-step, more than the model run.
"""

from __future__ import annotations

import asyncio
from collections import deque


class SessionLock:
    __slots__ = ("held", "_waiters")

    def __init__(self) -> None:
        self.held = False
        """Free means no live waiter either: `release` hands the lock to the first one."""
        self._waiters: deque[asyncio.Future] | None = None

    def locked(self) -> bool:
        return self.held

    def take(self) -> bool:
        """Acquire now if free; never waits."""
        if self.held:
            return False
        self.held = True
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
        while self._waiters:
            granted = self._waiters.popleft()
            if not granted.done():
                granted.set_result(True)  # it wakes holding the lock
                return
        self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def all_free(locks: list[SessionLock]) -> bool:
    """Whether no lock is held (free locks have no waiters). Work done with no await in
    between needs only this: no one can take a lock before it ends. Plain loops: on CPython
    3.11 they beat any(map(attrgetter(...))) about twofold."""
    for lock in locks:
        if lock.held:
            return False
    return True


def take_all(locks: list[SessionLock]) -> bool:
    """Take every lock now, if every one is free (a loop turn with no await); else none."""
    if not all_free(locks):
        return False
    for lock in locks:
        lock.held = True
    return True


def release_all(locks: list[SessionLock]) -> None:
    for lock in locks:
        if lock._waiters:
            lock.release()
        else:
            lock.held = False
