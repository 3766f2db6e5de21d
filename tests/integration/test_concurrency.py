"""Many threads on one sequence, every isolation level, and injected commit failures."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from conftest import FAST_RETRY
from ledger_check import check_gapless
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from together import at_once

from numbering import Allocator, RetriesExhaustedError, RetryPolicy, allocate, create_engine
from numbering.errors import LockNotAvailable, SerializationConflict

THREADS = 8
PER_THREAD = 250


def hammer(numbers: Allocator, name: str) -> dict[int, list[int]]:
    """THREADS threads each take PER_THREAD values one at a time; values per thread."""
    got: dict[int, list[int]] = {t: [] for t in range(THREADS)}

    def worker(t: int) -> None:
        for i in range(PER_THREAD):
            got[t].append(numbers.next_value(name, key=f"{name}:{t}:{i}"))

    at_once(THREADS, worker, timeout=120)
    return got


def assert_hammered(engine: Engine, name: str, got: dict[int, list[int]]) -> None:
    total = THREADS * PER_THREAD
    keys = [f"{name}:{t}:{i}" for t in range(THREADS) for i in range(PER_THREAD)]
    by_key = check_gapless(engine, name, keys=keys)
    assert sorted(v for values in by_key.values() for v in values) == list(range(1, total + 1))
    for t, values in got.items():
        assert values == sorted(values), f"thread {t} got decreasing numbers"
        assert values == [by_key[f"{name}:{t}:{i}"][0] for i in range(PER_THREAD)]


@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_threads_on_one_sequence_postgresql(pg_url: str, level: str) -> None:
    engine = create_engine(pg_url, pool_size=THREADS)
    numbers = Allocator(engine, isolation_level=level, retry=FAST_RETRY)
    numbers.create_sequence("hot")
    got = hammer(numbers, "hot")
    assert_hammered(engine, "hot", got)
    retries = numbers.stats.as_dict()
    if level == "READ COMMITTED":
        # The row lock serialises writers; READ COMMITTED re-reads after waiting.
        assert retries.get("total", 0) == 0, retries
    else:
        # A snapshot taken before the lock wait is stale once the lock is granted.
        assert retries.get("SerializationConflict", 0) > 0, retries
    engine.dispose()


def test_threads_on_one_sequence_sqlite(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url, pool_size=THREADS)
    numbers = Allocator(engine, retry=FAST_RETRY)
    numbers.create_sequence("hot")
    got = hammer(numbers, "hot")
    assert_hammered(engine, "hot", got)
    engine.dispose()


def wait_for_lock_waiter(engine: Engine, timeout: float = 10) -> None:
    """Block until some other session is waiting on a lock."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
            if waiting:
                return
            conn.rollback()
            time.sleep(0.01)
    raise AssertionError("nobody started waiting for the lock")


def test_exhausted_retries_raise_a_clear_error_and_write_nothing(pg_url: str) -> None:
    engine = create_engine(pg_url)
    numbers = Allocator(
        engine,
        isolation_level="REPEATABLE READ",
        retry=RetryPolicy(attempts=1, timeout=10, wait_initial=0, wait_max=0),
    )
    numbers.create_sequence("invoices")
    outcome: dict[str, BaseException] = {}

    def request() -> None:
        try:
            numbers.next_value("invoices", key="victim")
        except BaseException as exc:  # asserted below
            outcome["error"] = exc

    # An outside writer holds the counter row; the REPEATABLE READ request queues behind it
    # with a snapshot that is stale once the writer commits.
    with Session(engine) as session, session.begin():
        allocate(session, "invoices", key="outside")
        thread = threading.Thread(target=request)
        thread.start()
        wait_for_lock_waiter(engine)
    thread.join(10)

    error = outcome["error"]
    assert isinstance(error, RetriesExhaustedError)
    assert isinstance(error.__cause__, SerializationConflict)
    assert "gave up after 1 attempt" in str(error)
    assert "nothing was written" in str(error)
    check_gapless(engine, "invoices", keys=["outside"])


def test_nowait_refuses_a_locked_sequence(pg_url: str) -> None:
    engine = create_engine(pg_url)
    Allocator(engine).create_sequence("invoices")
    with Session(engine) as holder, holder.begin():
        allocate(holder, "invoices", key="holder")
        with Session(engine) as other, other.begin(), pytest.raises(LockNotAvailable):
            allocate(other, "invoices", key="impatient", nowait=True)
    check_gapless(engine, "invoices", keys=["holder"])


class LostCommitReply:
    """Make the next COMMIT's reply "never arrive": the connection drops around it.

    ``after=True``: the server commits, then the client sees the connection drop.
    ``after=False``: the connection drops before the COMMIT is sent (nothing commits).
    numbering's assignments send COMMIT as SQL, at the end of the round trip that also
    carries the transaction's writes (numbering.backends.psycopg2.run_pipelined).
    """

    def __init__(self, engine: Engine, *, after: bool) -> None:
        self.engine = engine
        self.after = after
        self.fired = False

    def _drop(self, connection: Any, statement: str, when_after: bool) -> None:
        if self.fired or self.after is not when_after or not statement.endswith("COMMIT"):
            return
        self.fired = True
        connection.connection.dbapi_connection.close()
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def _before(self, connection: Any, _cursor: Any, statement: str, *rest: Any) -> Any:
        self._drop(connection, statement, when_after=False)
        return statement, rest[0]

    def _after(self, connection: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        self._drop(connection, statement, when_after=True)

    def __enter__(self) -> LostCommitReply:
        event.listen(self.engine, "before_cursor_execute", self._before, retval=True)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
def test_lost_commit_reply_is_resolved_by_key_lookup(pg_url: str, committed: bool) -> None:
    engine = create_engine(pg_url)
    numbers = Allocator(engine, retry=FAST_RETRY)
    numbers.create_sequence("invoices")
    numbers.next_value("invoices", key="before")
    with LostCommitReply(engine, after=committed) as fault:
        block = numbers.next_block("invoices", key="invoice:9")
    assert fault.fired
    assert numbers.stats.as_dict().get("ConnectionLost") == 1
    # Either way the key has exactly one number, and it is the next one.
    assert block.value == 2
    assert block.resent is committed
    check_gapless(engine, "invoices", keys=["before", "invoice:9"])
    assert numbers.next_value("invoices", key="after") == 3


@pytest.mark.parametrize("snapshot_isolation", ["OFF", "ON"])
@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_threads_on_one_sequence_mariadb(
    mariadb_url: str, level: str, snapshot_isolation: str
) -> None:
    """InnoDB: a locking read returns the latest committed row whatever the level, so the
    counter's FOR UPDATE sees the last writer's value and nothing needs a retry; numbering's
    transaction starts with that locking read, so even REPEATABLE READ with
    innodb_snapshot_isolation=ON has no older snapshot to conflict with. SERIALIZABLE with
    it ON answers error 1020 ("record has changed since last read") under contention,
    which is retried. The setting is per session: the shared server is not touched."""
    engine = create_engine(
        mariadb_url,
        pool_size=THREADS,
        connect_args={
            "init_command": f"SET SESSION innodb_snapshot_isolation={snapshot_isolation}"
        },
    )
    numbers = Allocator(engine, isolation_level=level, retry=FAST_RETRY)
    numbers.create_sequence("hot")
    got = hammer(numbers, "hot")
    assert_hammered(engine, "hot", got)
    retries = numbers.stats.as_dict()
    if (level, snapshot_isolation) == ("SERIALIZABLE", "ON"):
        assert retries.get("SerializationConflict", 0) > 0, retries
        assert retries["total"] == retries["SerializationConflict"], retries
    else:
        assert retries.get("total", 0) == 0, retries
    engine.dispose()
