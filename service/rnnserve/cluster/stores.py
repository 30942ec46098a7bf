"""The state store --state-store names, opened: Redis for replicas on many machines, an SQLite
file for one. Both keep the SharedStore contract (rnnserve.engine.sources)."""

from __future__ import annotations

from rnnserve.cluster.disk_store import SqliteStore
from rnnserve.cluster.handoff import RedisHandoff
from rnnserve.engine.sources import SharedStore
from rnnserve.ops.config import SQLITE, ServerConfig


def open_store(config: ServerConfig) -> SharedStore | None:
    """None without --state-store. A record lives as long as the session would have: its idle
    timeout, plus --session-ttl where idle sessions wait there."""
    if not config.state_store:
        return None
    ttl = config.session_idle_timeout + config.session_ttl
    park = config.shutdown_grace + config.handoff_wait
    if config.state_store.startswith(SQLITE):
        return SqliteStore(config.state_store, ttl, config.handoff_wait, park)
    return RedisHandoff(config.state_store, ttl, config.handoff_wait, park)
