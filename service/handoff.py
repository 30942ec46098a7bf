"""Session handoff through Redis: a draining replica parks its sessions, any replica adopts one.

Adoption is GETDEL, so exactly one replica can take a parked session; the record expires after
the idle timeout like the session itself would have.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

import numpy as np

KEY_PREFIX = "rnnserve:session:"
ADOPT_POLL = 0.05


@dataclass(frozen=True)
class ParkedSession:
    session_id: str
    model: str
    version: int
    steps: int
    idle_seconds: float
    states: dict[str, np.ndarray]

    def encode(self) -> str:
        return json.dumps({
            "model": self.model, "version": self.version, "steps": self.steps,
            "idle_seconds": self.idle_seconds,
            "states": {k: base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode()
                       for k, v in self.states.items()}})

    @classmethod
    def decode(cls, session_id: str, text: bytes) -> ParkedSession:
        doc = json.loads(text)
        return cls(session_id, doc["model"], int(doc["version"]), int(doc["steps"]),
                   float(doc["idle_seconds"]),
                   {k: np.frombuffer(base64.b64decode(v), "<f4").copy()
                    for k, v in doc["states"].items()})


class RedisHandoff:
    def __init__(self, url: str, ttl_seconds: float, wait_seconds: float) -> None:
        import redis.asyncio as redis

        self.client = redis.from_url(url)
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.wait_seconds = wait_seconds

    async def park(self, sessions: list[ParkedSession]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for s in sessions:
                pipe.set(KEY_PREFIX + s.session_id, s.encode(), px=self.ttl_ms)
            await pipe.execute()

    async def adopt(self, session_id: str) -> ParkedSession | None:
        """Take the parked session, waiting briefly for a replica that is parking right now."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            text = await self.client.getdel(KEY_PREFIX + session_id)
            if text is not None:
                return ParkedSession.decode(session_id, text)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(ADOPT_POLL)

    async def give_back(self, parked: ParkedSession) -> None:
        """Re-park a session this replica cannot serve (its model version is not loaded here)."""
        await self.park([parked])

    async def close(self) -> None:
        await self.client.aclose()
