"""Session handoff through Redis: a draining replica parks its sessions, any replica adopts one;
and a replica that gets a call for a session another live replica holds asks for it.

Adoption is GETDEL (in one script for all of a message's ids), so exactly one replica can take a
parked session, and the adopter restores
it in the same event-loop turn as the reply arrives (or parks it again); the record expires after
the idle timeout like the session itself would have. All ids of one message go in one command,
so a message naming hundreds of parked sessions costs one round trip and one connection.

On demand: every process records which sessions it holds (`rnnserve:owner:<id>`, refreshed
while they live). When a proxy's hash ring changes (a scale-up adds a replica), calls for a
session reach a replica that does not hold it; that replica publishes a release request on the
holder's channel, the holder parks the session after its in-flight steps, and the asker adopts
it as above. Redis does all the coordination; there is no cluster protocol of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time

from rnnserve.engine.sources import (
    Adoption,
    ParkedSession,
    StoreUnavailable,
    decode_or_lose,
    record_ttl,
    store_key,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "rnnserve:session:"
OWNER_PREFIX = "rnnserve:owner:"
"""Which process holds a live session (its `replica` id), so another can ask for it."""
RELEASE_CHANNEL = "rnnserve:release:"
"""Pub/sub channel per process: requests to park some of its sessions now."""
RESUBSCRIBE_PAUSE = 1.0
PARKING_KEY = "rnnserve:parking"
"""A sorted set of the replicas parking their sessions right now, scored by when they will be
done at the latest (ms since the epoch): adopters wait only while it holds a live entry."""
ADOPT_POLL = 0.05
FIRST_POLL = 0.0005
MAX_CONNECTIONS = 16
POOL_WAIT = 5.0
SOCKET_TIMEOUT = 5.0


TAKE_SCRIPT = """
local reply = {redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')}
local skip = tonumber(ARGV[3]) + 1
for i = 2, #KEYS do
  local record = redis.call('GETDEL', KEYS[i])
  if record then
    reply[#reply + 1] = i - 1
    reply[#reply + 1] = record
  elseif ARGV[2] ~= '' then
    local holder = redis.call('GET', ARGV[2] .. string.sub(KEYS[i], skip))
    if holder and holder ~= ARGV[4] then
      reply[#reply + 1] = 1 - i
      reply[#reply + 1] = holder
    end
  end
end
return reply
"""
"""How many replicas are parking; then, for each session key, its record taken out of the
store (GETDEL) as (its 1-based position, the record), or else, if asked (ARGV[2] is the holders'
prefix), the live replica holding it as (minus its position, that replica). One command and a
sparse reply, not a command or a reply element per id: with a pipeline, redis-py reads a reply
per command, and parsing a reply element per id, most of them nil, was most of an unknown id's
cost (bench/unknown_ids.py; docs/benchmarks.md)."""
CLAIM_NEW_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'parked'
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1]
    and redis.call('PUBSUB', 'NUMSUB', ARGV[3] .. holder)[2] > 0 then
  return holder
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return false
"""
"""Record this replica as the holder of a new session unless its id is parked or held by another
live replica: one atomic check-and-set, so two replicas opening one id cannot both win. A holder
is live while it listens on its release channel: the record of a process that died (SIGKILL,
the OOM killer) would otherwise keep its ids from being opened again until it expires."""
UNCLAIM_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
"""
"""Drop the holder records that still name this replica (another may have taken one since)."""


class RedisHandoff:
    """Parks and adopts sessions through Redis over a bounded pool of connections: a burst of
    adoptions waits for a connection instead of failing with 'Too many connections'."""

    def __init__(
        self, url: str, ttl_seconds: float, wait_seconds: float, park_seconds: float
    ) -> None:
        import redis.asyncio as redis

        self._errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
        )
        self.client = redis.Redis(connection_pool=pool)
        self.ttl = ttl_seconds
        self.wait_seconds = wait_seconds
        self.park_ms = max(1, int(park_seconds * 1000))
        self.replica = secrets.token_hex(8)
        self._take = self.client.register_script(TAKE_SCRIPT)
        self._claim_new = self.client.register_script(CLAIM_NEW_SCRIPT)
        self._unclaim = self.client.register_script(UNCLAIM_SCRIPT)

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
        """All the sessions, or StoreUnavailable and none of them: a failure partway (Redis
        full: 'OOM command not allowed' for the SETs past maxmemory) deletes the records the
        batch did write, since the caller keeps every session live, and a record left beside
        a live session could be adopted elsewhere and diverge from it."""
        keys = [KEY_PREFIX + store_key(s.owner, s.session_id) for s in sessions]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, s in zip(keys, sessions):
                    pipe.set(key, s.encode(), px=max(1, int(1000 * record_ttl(self.ttl, s))))
                if done_parking:
                    pipe.zrem(PARKING_KEY, self.replica)  # adopters need not wait for us
                await pipe.execute()
        except self._errors as exc:
            if keys:
                with contextlib.suppress(*self._errors):  # DEL runs even when Redis is full
                    await self.client.delete(*keys)
            raise StoreUnavailable(f"the shared state store failed ({exc})") from None

    async def adopt(
        self, session_ids: list[str], owner: str, wait: bool, expected: bool = False
    ) -> Adoption:
        """Take the owner's parked sessions among `session_ids`, in one round trip per try,
        and learn which live replicas hold the others. While a replica is parking (and
        `wait`), or while their holders were asked to park them (`expected`), missing ids are
        asked for again until the handoff wait ends. Each session taken is removed from the
        store; the caller must restore it or give it back."""
        deadline = time.monotonic() + self.wait_seconds
        adoption = Adoption({}, {})
        missing = list(session_ids)
        tries = 0
        while missing:
            try:
                parking, taken = await self._take_once(
                    missing, owner, adoption, ask_holders=not expected and not tries
                )
            except self._errors as exc:
                if not adoption.taken and not adoption.unreadable:
                    raise StoreUnavailable(
                        f"the shared state store is unreachable ({exc})"
                    ) from None
                break  # already out of the store: the caller restores them
            adoption.taken.update(taken)
            missing = [i for i in missing if i not in taken and i not in adoption.unreadable]
            if not (missing and (parking and wait or expected)) or time.monotonic() >= deadline:
                break
            tries += 1  # a holder asked to park takes a millisecond or two: look again soon
            await asyncio.sleep(min(ADOPT_POLL, FIRST_POLL * 2**tries))
        # holders are asked for on the first try only: a later try may have taken their ids
        adoption.held = {
            holder: ids
            for holder, held in adoption.held.items()
            if (ids := [i for i in held if i not in adoption.taken])
        }
        return adoption

    async def _take_once(
        self, session_ids: list[str], owner: str, adoption: Adoption, ask_holders: bool
    ) -> tuple[bool, dict[str, ParkedSession]]:
        """One run of TAKE_SCRIPT: whether a replica is parking, and the sessions taken; the
        ids other replicas hold are added to the adoption's `held` by holder, those whose
        records are unreadable to its `unreadable`."""
        reply = await self._take(
            keys=[PARKING_KEY, *(KEY_PREFIX + store_key(owner, i) for i in session_ids)],
            args=[_now_ms(), OWNER_PREFIX if ask_holders else "", len(KEY_PREFIX), self.replica],
        )
        taken: dict[str, ParkedSession] = {}
        for position, value in zip(reply[1::2], reply[2::2]):
            if position < 0:
                adoption.held.setdefault(value.decode(), []).append(session_ids[-position - 1])
                continue
            session_id = session_ids[position - 1]
            decoded = decode_or_lose(session_id, value, adoption)
            if decoded is not None:
                taken[session_id] = decoded
        return bool(reply[0]), taken

    async def parking(self) -> bool:
        """Whether a replica is parking sessions right now (False when the store is down)."""
        try:
            return bool(await self.client.zcount(PARKING_KEY, _now_ms(), "+inf"))
        except self._errors:
            return False

    async def give_back(self, parked: list[ParkedSession]) -> None:
        """Re-park sessions this replica cannot serve (e.g. their version is not loaded here)."""
        await self._store(parked, done_parking=False)

    async def claim(self, keys: list[str], ttl_ms: int) -> None:
        """Record this process as the holder of these sessions (their `store_key`s). Best
        effort: without a record a call elsewhere finds no holder to ask, and answers
        NOT_FOUND."""
        if not keys:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(OWNER_PREFIX + key, self.replica, px=ttl_ms)
                await pipe.execute()
        except self._errors as exc:
            log.warning("could not record %d sessions as held here: %s", len(keys), exc)

    async def unclaim(self, keys: list[str]) -> None:
        """Drop this process's holder records of sessions that ended here. Best effort: a record
        left behind expires with its TTL, and until then keeps its id from being opened anew on
        another replica."""
        if not keys:
            return
        try:
            await self._unclaim(keys=[OWNER_PREFIX + key for key in keys], args=[self.replica])
        except self._errors as exc:
            log.warning("could not drop the records of %d ended sessions: %s", len(keys), exc)

    async def claim_new(self, key: str, ttl_ms: int) -> str | None:
        """Record this process as the holder of a newly opened session (its `store_key`); where
        its id is already taken, "parked" or the replica holding it, and nothing is recorded."""
        try:
            where = await self._claim_new(
                keys=[KEY_PREFIX + key, OWNER_PREFIX + key],
                args=[self.replica, ttl_ms, RELEASE_CHANNEL],
            )
        except self._errors as exc:
            raise StoreUnavailable(f"the shared state store is unreachable ({exc})") from None
        return None if where is None else where.decode()

    async def request_release(self, held: dict[str, list[str]], owner: str) -> bool:
        """Ask the replicas holding these sessions (ids by holder, as `adopt` found them) to
        park them now; whether any heard."""
        try:
            heard = 0
            for holder, ids in held.items():
                heard += await self.client.publish(
                    RELEASE_CHANNEL + holder, json.dumps({"ids": ids, "owner": owner})
                )
        except self._errors as exc:
            raise StoreUnavailable(f"the shared state store is unreachable ({exc})") from None
        return heard > 0

    async def serve_releases(self, release) -> None:
        """Until cancelled: park what other replicas ask for. `release(ids, owner)` lets the
        sessions go (after their in-flight steps) and returns them; they are parked, or taken
        back by `restore` if the store fails meanwhile."""
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(RELEASE_CHANNEL + self.replica)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._release(release, message["data"])
            except self._errors as exc:
                log.warning("release requests unheard until the store is back: %s", exc)
                await asyncio.sleep(RESUBSCRIBE_PAUSE)

    async def _release(self, release, data: bytes) -> None:
        try:
            request = json.loads(data)
            ids, owner = [str(i) for i in request["ids"]], str(request["owner"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored an unreadable release request")
            return
        try:
            await release(ids, owner)
        except self._errors:
            raise  # the store: serve_releases subscribes again once it is back
        except Exception:  # one request's failure must not end the listening for good
            log.exception("a release request for %d sessions failed; they stay here", len(ids))

    async def close(self) -> None:
        await self.client.aclose()


def _now_ms() -> int:
    return int(time.time() * 1000)
