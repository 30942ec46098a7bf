"""The state store of one machine: parked sessions in an SQLite database on local disk
(`--state-store sqlite://PATH`), shared by every worker of the server that opens it, kept
across its restarts. Redis (rnnserve.cluster.handoff) is the store for replicas on many
machines; both keep the SharedStore contract, and tests/test_stores.py runs the same tests on
each.

SQLite, from Python's standard library, in WAL mode: readers never wait for the writer, and
one transaction writes all of a drain's or a sweep's sessions. synchronous=NORMAL makes a
commit survive the process (SIGKILL, the OOM killer) without an fsync per commit; a power cut
may lose the last commits. A taken session is deleted in the transaction that reads it, so
exactly one worker takes it, as Redis's GETDEL does.

Calls run on one thread of the store's own: a commit can wait on the disk, and the event loop
must not.

What Redis records beyond parked sessions (which replica holds which live session, release
requests between replicas) has no use here: the workers of one server find each other's live
sessions through their own sibling calls (rnnserve.cluster.siblings), and no other server
shares the file. So claims record nothing and no release request is ever heard.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from rnnserve.engine.sources import (
    Adoption,
    ParkedSession,
    StoreUnavailable,
    decode_or_lose,
    record_ttl,
    store_key,
)
from rnnserve.ops.config import sqlite_path

BUSY_TIMEOUT_MS = 5000
"""How long a write waits for another worker's transaction before giving up."""
ADOPT_POLL = 0.05
SCHEMA = """
CREATE TABLE IF NOT EXISTS parked (
    key TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS parked_expires ON parked (expires);
CREATE TABLE IF NOT EXISTS parking (
    server TEXT PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;
"""
T = TypeVar("T")


class SqliteStore:
    """Parks and adopts sessions in an SQLite database file."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        wait_seconds: float,
        park_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = sqlite_path(url)
        self.ttl = ttl_seconds
        self.wait_seconds = wait_seconds
        self.park_seconds = park_seconds
        self.process = secrets.token_hex(8)
        """This process's parking mark: adopters wait while any process is parking."""
        self.clock = clock
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="state-store")
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        """Opened on the store's thread at first use: a directory that cannot hold the file is
        then StoreUnavailable for the call, like a Redis that is down."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def transaction() -> T:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                result = work(db)
                db.execute("COMMIT")
                return result
            except BaseException:
                self._abandon(db)
                raise

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, transaction)
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: closed
            raise StoreUnavailable(f"the state store {self.path} failed ({exc})") from None

    def _abandon(self, db: sqlite3.Connection) -> None:
        """After a failure: roll back what is open, so this connection never keeps the
        file's write lock (a COMMIT that failed on a full disk would hold it, and every
        worker's next write would wait out the busy timeout); a connection that cannot even
        do that is closed, and the next call opens a new one."""
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            db.close()
            self._db = None

    async def announce_parking(self) -> None:
        until = self.clock() + self.park_seconds
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO parking VALUES (?, ?)", (self.process, until)
            )
        )

    async def park(self, sessions: list[ParkedSession]) -> None:
        await self._store(sessions, done_parking=True)

    async def give_back(self, parked: list[ParkedSession]) -> None:
        await self._store(parked, done_parking=False)

    async def _store(self, sessions: list[ParkedSession], done_parking: bool) -> None:
        now = self.clock()
        rows = [
            (store_key(s.owner, s.session_id), s.encode().encode(), now + record_ttl(self.ttl, s))
            for s in sessions
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM parked WHERE expires <= ?", (now,))
            db.executemany("INSERT OR REPLACE INTO parked VALUES (?, ?, ?)", rows)
            if done_parking:
                db.execute("DELETE FROM parking WHERE server = ?", (self.process,))

        await self._run(write)

    async def adopt(
        self, session_ids: list[str], owner: str, wait: bool, expected: bool = False
    ) -> Adoption:
        """Take the owner's parked sessions among `session_ids`, one transaction per try; while
        this server is parking (and `wait`), missing ids are asked for again until the handoff
        wait ends. Each session taken is out of the store: the caller restores it or gives it
        back. No other server holds live sessions here, so `held` stays empty."""
        deadline = time.monotonic() + self.wait_seconds
        adoption = Adoption({}, {})
        missing = list(session_ids)
        while missing:
            try:
                parking, taken = await self._take_once(missing, owner, adoption)
            except StoreUnavailable:
                if not adoption.taken and not adoption.unreadable:
                    raise
                break  # already out of the store: the caller restores them
            adoption.taken.update(taken)
            missing = [i for i in missing if i not in taken and i not in adoption.unreadable]
            if not (missing and parking and wait) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(ADOPT_POLL)
        return adoption

    async def _take_once(
        self, session_ids: list[str], owner: str, adoption: Adoption
    ) -> tuple[bool, dict[str, ParkedSession]]:
        keys = {store_key(owner, i): i for i in session_ids}
        now = self.clock()

        def take(db: sqlite3.Connection) -> tuple[bool, list[tuple[str, bytes]]]:
            parking = db.execute("SELECT 1 FROM parking WHERE until > ?", (now,)).fetchone()
            found: list[tuple[str, bytes]] = []
            for chunk in _chunks(list(keys), 500):  # SQLite's bound-parameter limit
                marks = ",".join("?" * len(chunk))
                found += db.execute(
                    f"DELETE FROM parked WHERE key IN ({marks}) AND expires > ? "  # noqa: S608
                    "RETURNING key, record",
                    (*chunk, now),
                ).fetchall()
            return parking is not None, found

        parking, found = await self._run(take)
        taken: dict[str, ParkedSession] = {}
        for key, record in found:
            decoded = decode_or_lose(keys[key], record, adoption)
            if decoded is not None:
                taken[keys[key]] = decoded
        return parking, taken

    async def parking(self) -> bool:
        now = self.clock()
        try:
            return await self._run(
                lambda db: (
                    db.execute("SELECT 1 FROM parking WHERE until > ?", (now,)).fetchone()
                    is not None
                )
            )
        except StoreUnavailable:
            return False

    async def claim_new(self, key: str, ttl_ms: int) -> str | None:
        """ "parked" where a session of this id is parked (the client resumes it instead);
        None otherwise. Live sessions of this server are each worker's own concern."""
        now = self.clock()
        row = await self._run(
            lambda db: db.execute(
                "SELECT 1 FROM parked WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
        )
        return None if row is None else "parked"

    async def claim(self, keys: list[str], ttl_ms: int) -> None:
        """Nothing to record: only this server's workers use the file (module docstring)."""

    async def unclaim(self, keys: list[str]) -> None:
        """Nothing was recorded (see `claim`)."""

    async def request_release(self, held: dict[str, list[str]], owner: str) -> bool:
        """No other server holds sessions of this store: `adopt` never names a holder."""
        return False

    async def serve_releases(self, release) -> None:
        """No other server can ask for a session: wait until cancelled."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=False)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
