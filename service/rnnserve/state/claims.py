"""Which sessions the workers of one server hold, in one table they share.

Each worker has its own session table; a session moves to the worker that gets its calls. Two
facts are about the server as a whole, though: a client-chosen id names one session (opened
through two workers at once it gave two sessions that then diverged, and a later move kept one
and dropped the other), and --max-sessions-per-client caps what a client holds in all (with 2
workers a client held twice its cap). So every session is also a row of a SQLite table in the
supervisor's run directory: opening one checks and inserts in one write transaction, which
SQLite makes atomic across processes; a move marks the row as lent by its holder, and the
receiver's arrival and the holder's taking back (if the arrival never came) each change only a
row so marked, so exactly one of them keeps the session; an end deletes the row; and the
supervisor moves a dead worker's rows to a table of lost sessions before starting it again, so
a later call for one is told it was lost (not that no such session exists) for LOST_MEMORY.

SQLite from the standard library, in WAL mode without fsync (the file lives as long as the
server): an open costs one short write transaction, an end another, and steps touch nothing
(docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from rnnserve.errors import AlreadyExists, ResourceExhausted, Unavailable

FILE = "sessions.sqlite"
BUSY_TIMEOUT = 5.0
"""Seconds a worker waits for another's write to end: each holds the lock for microseconds."""

LOST_MEMORY = 3600.0
"""Seconds a session lost with its worker is remembered as lost: its client's next calls, which
come within seconds, are told so."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner TEXT NOT NULL, id TEXT NOT NULL, worker INTEGER NOT NULL,
    PRIMARY KEY (owner, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS by_worker ON sessions (worker);
CREATE TABLE IF NOT EXISTS lost (
    owner TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (owner, id));
"""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    return db


def lent_by(worker: int) -> int:
    """The worker value of a row whose session `worker` let go to a sibling, not yet arrived:
    the arrival and the lender's taking back both change only such a row, so exactly one of
    them wins."""
    return -1 - worker


def create(run_dir: Path) -> None:
    """Make the table, once, before the workers start."""
    db = _connect(run_dir / FILE)
    try:
        db.executescript(_SCHEMA)
    finally:
        db.close()


def forget_worker(run_dir: Path, worker: int) -> int:
    """Move what a dead worker held or was lending (its sessions died with it) to the lost
    sessions, forgetting those lost longer than LOST_MEMORY ago; how many it held."""
    db = _connect(run_dir / FILE)
    now = time.time()
    try:
        with db:  # one transaction
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM lost WHERE at < ?", (now - LOST_MEMORY,))
            db.execute(
                "INSERT OR REPLACE INTO lost SELECT owner, id, ? FROM sessions "
                "WHERE worker IN (?, ?)",
                (now, worker, lent_by(worker)),
            )
            return db.execute(
                "DELETE FROM sessions WHERE worker IN (?, ?)", (worker, lent_by(worker))
            ).rowcount
    finally:
        db.close()


class Claims:
    """One worker's view of the shared table. A failure of the table itself (a full disk, a
    lock held past BUSY_TIMEOUT) is Unavailable to the caller, never a crash."""

    def __init__(self, run_dir: Path, worker: int, max_per_client: int) -> None:
        self.db = _connect(run_dir / FILE)
        self.worker = worker
        self.max_per_client = max_per_client

    def open(self, owner: str, session_id: str, chosen: bool) -> None:
        """Record a new session of `owner`'s here. Raises AlreadyExists when a chosen id is
        live on any worker, ResourceExhausted when the client holds its cap in all."""
        with _failing_as_unavailable():
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                if (
                    chosen
                    and db.execute(
                        "SELECT 1 FROM sessions WHERE owner = ? AND id = ?", (owner, session_id)
                    ).fetchone()
                ):
                    raise AlreadyExists(
                        f"session {session_id} is already open; pick a new random id"
                    )
                if (
                    self.max_per_client
                    and db.execute(
                        "SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)
                    ).fetchone()[0]
                    >= self.max_per_client
                ):
                    raise ResourceExhausted(
                        f"this client holds its maximum of {self.max_per_client} sessions "
                        "(--max-sessions-per-client); close finished ones"
                    )
                db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?)", (owner, session_id, self.worker)
                )
                db.execute("DELETE FROM lost WHERE owner = ? AND id = ?", (owner, session_id))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def lend(self, owner: str, session_id: str) -> None:
        """This worker lets the session go to a sibling: the row says so until it arrives."""
        with _failing_as_unavailable():
            self.db.execute(
                "UPDATE sessions SET worker = ? WHERE owner = ? AND id = ?",
                (lent_by(self.worker), owner, session_id),
            )

    def arrive(self, owner: str, session_id: str) -> bool:
        """A session lent by a sibling (or by this worker, coming back) is here: whether it is
        this worker's now. False when it is not lent (its lender took it back, or another
        worker holds it): then it must not be kept."""
        with _failing_as_unavailable():
            return (
                self.db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?) ON CONFLICT (owner, id) DO UPDATE SET "
                    "worker = excluded.worker WHERE worker < 0",
                    (owner, session_id, self.worker),
                ).rowcount
                == 1
            )

    def take_back(self, owner: str, session_id: str) -> bool:
        """Whether a session this worker lent is its own again: True when it never arrived
        anywhere (the row still says lent by this worker)."""
        with _failing_as_unavailable():
            return (
                self.db.execute(
                    "UPDATE sessions SET worker = ? WHERE owner = ? AND id = ? AND worker = ?",
                    (self.worker, owner, session_id, lent_by(self.worker)),
                ).rowcount
                == 1
            )

    def end(self, owner: str, session_id: str) -> None:
        """The session left the server: closed, evicted, parked in the store, or lost."""
        with _failing_as_unavailable():
            self.db.execute("DELETE FROM sessions WHERE owner = ? AND id = ?", (owner, session_id))

    def lost(self, owner: str, session_ids: list[str]) -> list[str]:
        """Those of the owner's ids whose sessions died with their worker (forget_worker)."""
        with _failing_as_unavailable():
            return [
                row[0]
                for row in self.db.execute(
                    "SELECT id FROM lost WHERE owner = ? "
                    "AND id IN (SELECT value FROM json_each(?))",
                    (owner, json.dumps(session_ids)),
                )
            ]

    def here(self) -> list[tuple[str, str]]:
        """The (owner, id) of every row naming this worker, as holder or as lender."""
        with _failing_as_unavailable():
            return self.db.execute(
                "SELECT owner, id FROM sessions WHERE worker IN (?, ?)",
                (self.worker, lent_by(self.worker)),
            ).fetchall()


@contextlib.contextmanager
def _failing_as_unavailable() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise Unavailable(
            f"the workers' shared session table failed ({exc}); retry", retry_after=1.0
        ) from None
