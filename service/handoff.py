"""Session handoff through Redis: a draining replica parks its sessions, any replica adopts one.

Adoption is GETDEL, so exactly one replica can take a parked session, and the adopter restores
it in the same event-loop turn as the reply arrives (or parks it again); the record expires after
the idle timeout like the session itself would have. All ids of one message go in one pipeline,
so a message naming hundreds of parked sessions costs one round trip and one connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

KEY_PREFIX = "rnnserve:session:"
PARKING_KEY = "rnnserve:parking"
"""A sorted set of the replicas parking their sessions right now, scored by when they will be
done at the latest (ms since the epoch): adopters wait only while it holds a live entry."""
ADOPT_POLL = 0.05
MAX_CONNECTIONS = 16
POOL_WAIT = 5.0
SOCKET_TIMEOUT = 5.0


@dataclass(frozen=True)
class ParkedSession:
    session_id: str
    owner: str
    model: str
    version: int
    steps: int
    idle_seconds: float
    states: dict[str, np.ndarray]

    def encode(self) -> str:
        return json.dumps({
            "owner": self.owner, "model": self.model, "version": self.version,
            "steps": self.steps,
            "idle_seconds": self.idle_seconds,
            "states": {k: base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode()
                       for k, v in self.states.items()}})

    @classmethod
    def decode(cls, session_id: str, text: bytes) -> ParkedSession:
        doc = json.loads(text)
        return cls(session_id, str(doc.get("owner", "")), doc["model"], int(doc["version"]),
                   int(doc["steps"]),
                   float(doc["idle_seconds"]),
                   {k: np.frombuffer(base64.b64decode(v), "<f4").copy()
                    for k, v in doc["states"].items()})


class StoreUnavailable(Exception):
    """The shared store could not be reached; nothing was taken out of it."""


class RedisHandoff:
    """Parks and adopts sessions through Redis over a bounded pool of connections: a burst of
    adoptions waits for a connection instead of failing with 'Too many connections'."""

    def __init__(self, url: str, ttl_seconds: float, wait_seconds: float,
                 park_seconds: float) -> None:
        import redis.asyncio as redis

        self._errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT,
            socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT)
        self.client = redis.Redis(connection_pool=pool)
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.wait_seconds = wait_seconds
        self.park_ms = max(1, int(park_seconds * 1000))
        self.replica = secrets.token_hex(8)

    async def announce_parking(self) -> None:
        """Mark, before in-flight work ends, that this replica is about to park its sessions:
        clients sent away now may ask another replica before the sessions arrive."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(PARKING_KEY, {self.replica: _now_ms() + self.park_ms})
                pipe.pexpire(PARKING_KEY, self.park_ms)
                await pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"the shared state store is unreachable ({exc})") from None

    async def park(self, sessions: list[ParkedSession]) -> None:
        """Store every session (StoreUnavailable if that fails) and end this replica's
        parking mark."""
        await self._store(sessions, done_parking=True)

    async def _store(self, sessions: list[ParkedSession], done_parking: bool) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for s in sessions:
                    pipe.set(KEY_PREFIX + s.session_id, s.encode(), px=self.ttl_ms)
                if done_parking:
                    pipe.zrem(PARKING_KEY, self.replica)  # adopters need not wait for us
                await pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"the shared state store is unreachable ({exc})") from None

    async def adopt(self, session_ids: list[str], wait: bool) -> dict[str, ParkedSession]:
        """Take the parked sessions among `session_ids`, in one round trip per try. While a
        replica is parking (and `wait`), missing ids are asked for again until the handoff wait
        ends. Each session taken is removed from the store; the caller must restore it or
        give it back."""
        deadline = time.monotonic() + self.wait_seconds
        taken: dict[str, ParkedSession] = {}
        missing = list(session_ids)
        while missing:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for session_id in missing:
                        pipe.getdel(KEY_PREFIX + session_id)
                    pipe.zcount(PARKING_KEY, _now_ms(), "+inf")
                    *texts, parking = await pipe.execute()
            except self._errors as exc:
                if taken:  # already out of the store: the caller restores them
                    return taken
                raise StoreUnavailable(f"the shared state store is unreachable ({exc})") from None
            for session_id, text in zip(missing, texts):
                if text is None:
                    continue
                try:
                    taken[session_id] = ParkedSession.decode(session_id, text)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("LOST session %s: its parked record is unreadable (%s)",
                              session_id, exc)
            missing = [i for i in missing if i not in taken]
            if not (missing and parking and wait) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(ADOPT_POLL)
        return taken

    async def parking(self) -> bool:
        """Whether a replica is parking sessions right now (False when the store is down)."""
        try:
            return bool(await self.client.zcount(PARKING_KEY, _now_ms(), "+inf"))
        except self._errors:
            return False

    async def give_back(self, parked: list[ParkedSession]) -> None:
        """Re-park sessions this replica cannot serve (e.g. their version is not loaded here)."""
        await self._store(parked, done_parking=False)

    async def close(self) -> None:
        await self.client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)
