"""One active consumer per queue, enforced by a lock the operating system releases.

Each engine's backend holds the lock (:meth:`numbering.backends.base.Backend.consumer_lock`):
on PostgreSQL a session advisory lock on a dedicated connection, on SQLite an exclusive
``flock`` on a file next to the database. Either is released the moment the holder's
process dies, so a standby that keeps asking takes over at once. A second consumer
started by mistake waits as a standby instead of consuming. Correctness never depends on
this: the database serialises assignments regardless.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine

from numbering.backends import ConsumerLock, backend_for

__all__ = ["ConsumerLock", "consumer_alive", "consumer_lock"]


def consumer_lock(engine: Engine, queue: str) -> ConsumerLock:
    """The lock that makes its holder the active consumer of ``queue`` (not yet taken)."""
    return backend_for(engine).consumer_lock(engine, queue)


def consumer_alive(database: Engine | Connection, queue: str) -> bool:
    """True when some process holds ``queue``'s consumer lock (is its active consumer),
    asked on ``database`` (an engine, or a connection to ask on)."""
    return backend_for(database).consumer_alive(database, queue)
