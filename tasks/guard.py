"""One active consumer per queue, enforced by a lock the operating system releases.

On PostgreSQL the active consumer holds a session advisory lock on a dedicated
connection; on SQLite, an exclusive ``flock`` on a file next to the database. Either is
released the moment the holder's process dies, so a standby that keeps asking takes over
at once. A second consumer started by mistake waits as a standby instead of consuming.
Correctness never depends on this: the database serialises assignments regardless.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from numbering.database import is_sqlite

__all__ = ["ConsumerLock", "consumer_alive"]

log = logging.getLogger("numbering.worker")


def _lock_key(queue: str) -> int:
    digest = hashlib.sha256(f"numbering-consumer:{queue}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def consumer_alive(engine: Engine, queue: str) -> bool:
    """True when some process holds ``queue``'s consumer lock (is its active consumer)."""
    if is_sqlite(engine):
        probe = ConsumerLock(engine, queue)
        if probe.try_acquire():  # free: nobody consumes
            probe.release()
            return False
        return True
    key = _lock_key(queue) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows the key as two oids
    with engine.connect() as connection:
        found = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = :high AND objid = :low AND objsubid = 1 "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"high": key >> 32, "low": key & 0xFFFFFFFF},
        ).scalar_one()
    return bool(found)


class ConsumerLock:
    """The lock that makes its holder the active consumer of ``queue``."""

    def __init__(self, engine: Engine, queue: str) -> None:
        self.engine = engine
        self.queue = queue
        self._connection: Connection | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None or self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process now holds it."""
        if self.held:
            return True
        if is_sqlite(self.engine):
            return self._try_flock()
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": _lock_key(self.queue)}
            ).scalar_one()
        except Exception:
            connection.close()
            raise
        if got:
            self._connection = connection
            return True
        connection.close()
        return False

    def _try_flock(self) -> bool:
        database = self.engine.url.database or "numbering"
        path = Path(f"{database}.{self.queue}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        """False if the lock's database session died (then another consumer may hold it)."""
        if self._fd is not None:
            return True
        if self._connection is None:
            return False
        try:
            self._connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError:
            log.warning("lost the consumer lock's database session for %s", self.queue)
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._connection is not None:
            # Invalidate, not close: a closed connection goes back to the pool with its
            # session, and the session would keep holding the advisory lock.
            try:
                self._connection.invalidate()
                self._connection.close()
            except sa.exc.DBAPIError:  # already gone; the server dropped the lock with it
                pass
            self._connection = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
