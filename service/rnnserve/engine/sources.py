"""Where sessions come from when they are not live in this process, as the engine sees it: the
sibling workers of this server, and the store replicas share. The engine holds them as these
protocols; rnnserve.cluster implements them (gRPC over unix sockets, Redis), so the engine
imports no transport and is tested without one.

A session on the move is a ParkedSession: its id, owner, model, step count and state tensors,
checked before it takes a slot wherever it arrives.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

import numpy as np

log = logging.getLogger(__name__)

MOVE_CALL_TIMEOUT = 5.0
"""Seconds a call to a sibling worker may take: one that does not answer in time (restarting,
wedged) is skipped for this call. A session lent to a sibling has arrived there, or never will,
once this has passed."""


MAX_STEPS = 2**62
"""Step counts past this are no session's (a record claiming more is corrupt)."""


@dataclass(frozen=True)
class ParkedSession:
    session_id: str
    owner: str
    model: str
    version: int
    steps: int
    idle_seconds: float
    states: dict[str, np.ndarray]
    graph: str = ""
    """sha256 of the model.onnx the states came from ("" where unknown: between workers)."""

    def encode(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "model": self.model,
                "version": self.version,
                "steps": self.steps,
                "idle_seconds": self.idle_seconds,
                "graph": self.graph,
                "states": {
                    k: base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode()
                    for k, v in self.states.items()
                },
            }
        )

    @classmethod
    def decode(cls, session_id: str, text: bytes) -> ParkedSession:
        """The record, or ValueError naming what is wrong with it: the store is shared, and
        whatever it holds is checked before it takes a slot."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        model, version, steps = doc.get("model"), doc.get("version"), doc.get("steps")
        idle, owner, graph = doc.get("idle_seconds"), doc.get("owner", ""), doc.get("graph", "")
        states = doc.get("states")
        if not (isinstance(model, str) and isinstance(owner, str) and isinstance(graph, str)):
            raise ValueError("model, owner and graph must be strings")
        if not (_whole(version) and version >= 1 and _whole(steps) and 0 <= steps <= MAX_STEPS):
            raise ValueError(f"version {version!r} or steps {steps!r} out of range")
        if not (
            isinstance(idle, int | float)
            and not isinstance(idle, bool)
            and math.isfinite(idle)
            and idle >= 0
        ):
            raise ValueError(f"idle_seconds {idle!r} is not a finite time")
        if not isinstance(states, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in states.items()
        ):
            raise ValueError("states must map names to base64 strings")
        arrays = {}
        for name, encoded in states.items():
            raw = base64.b64decode(encoded, validate=True)
            if len(raw) % 4:
                raise ValueError(f"state {name!r} is not float32 data")
            arrays[name] = np.frombuffer(raw, "<f4").copy()
        return cls(session_id, owner, model, version, steps, float(idle), arrays, graph)

    def mismatch(self, states: list[tuple[str, int]], graph: str) -> str | None:
        """Why these states cannot be taken by a model with these (name, size) state tensors
        and this graph; None when they fit."""
        if self.graph and graph and self.graph != graph:
            return "it was parked by another graph of that name and version"
        for name, size in states:
            state = self.states.get(name)
            if state is None or state.shape != (size,):
                return f"state {name} is not {size} floats"
            if not np.isfinite(state).all():
                return f"state {name} holds NaN or Inf"
        return None


def decode_or_lose(session_id: str, record: bytes, adoption: Adoption) -> ParkedSession | None:
    """A record a store just took out, decoded; or None, with the session logged as lost and
    the reason kept in the adoption for its call (the record is gone from the store either
    way: it could never be served)."""
    try:
        return ParkedSession.decode(session_id, record)
    except (ValueError, RecursionError) as exc:  # binascii's and json's errors included
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        log.error("LOST session %s: its parked record is unreadable (%s)", session_id, reason)
        adoption.unreadable[session_id] = reason
        return None


MIN_RECORD_TTL = 0.001


def record_ttl(lifetime: float, session: ParkedSession) -> float:
    """Seconds a parked record lives: what is left of the session's idle lifetime, so a
    session spilled after idling keeps the lifetime its flags give it, no more."""
    return max(MIN_RECORD_TTL, lifetime - session.idle_seconds)


def store_key(owner: str, session_id: str) -> str:
    """A session's name in the store: ids are each client's own, so the owner is part of it
    (client names hold no '/'); without auth every caller is "" and the key is the id."""
    return f"{owner}/{session_id}" if owner else session_id


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Adoption:
    """What one `adopt` found: the sessions it took out of the store, the ids it did not
    find parked that other live replicas hold (by holder), and the ids whose records it took
    out but could not read (with why): those sessions are lost, and their calls are told so."""

    taken: dict[str, ParkedSession]
    held: dict[str, list[str]]
    unreadable: dict[str, str] = field(default_factory=dict)


class StoreUnavailable(Exception):
    """The shared store could not be reached; nothing was taken out of it."""


Moves = tuple[dict[str, tuple[int, "ParkedSession"]], dict[str, str], set[str]]
"""What one ask of the sibling workers brought: the sessions they let go (with the worker each
came from), the ids a sibling ended recently (with why), and those not free to move now."""


class SiblingWorkers(Protocol):
    """The other workers of this server (rnnserve.cluster.siblings)."""

    async def take(self, session_ids: list[str], owner: str) -> Moves:
        """Ask every sibling at once to let the owner's sessions among these ids go."""
        ...

    async def give_back(self, index: int, sessions: list[ParkedSession]) -> list[str]:
        """Return sessions to the worker they came from; the ids lost on the way."""
        ...

    async def close(self) -> None: ...


class SharedStore(Protocol):
    """The store replicas share (rnnserve.cluster.handoff): parked sessions, and which replica
    holds each live one. Each method raises StoreUnavailable when the store cannot be reached,
    but for the best-effort records (claim, unclaim)."""

    async def announce_parking(self) -> None: ...

    async def park(self, sessions: list[ParkedSession]) -> None: ...

    async def give_back(self, parked: list[ParkedSession]) -> None: ...

    async def adopt(
        self, session_ids: list[str], owner: str, wait: bool, expected: bool = False
    ) -> Adoption: ...

    async def parking(self) -> bool: ...

    async def request_release(self, held: dict[str, list[str]], owner: str) -> bool: ...

    async def claim(self, keys: list[str], ttl_ms: int) -> None: ...

    async def unclaim(self, keys: list[str]) -> None: ...

    async def claim_new(self, key: str, ttl_ms: int) -> str | None: ...

    async def serve_releases(
        self, release: Callable[[list[str], str], Awaitable[None]]
    ) -> None: ...

    async def close(self) -> None: ...
