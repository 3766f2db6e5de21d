"""MariaDB (InnoDB) specifics, on the local server: what differs from PostgreSQL.

The shared tests (allocation, concurrency at every level, policies, batch jobs) run on
MariaDB through the ``db_url`` fixture; these are the behaviours only InnoDB has.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import FAST_RETRY
from integration.stack import Stack
from integration.tcpproxy import TcpProxy
from ledger_check import check_gapless
from sqlalchemy.engine import make_url
from together import at_once

from numbering import Allocator, Request, allocate, create_engine, init_db
from numbering.backends.mysql import MIGRATION_LOCK
from numbering.errors import LockNotAvailable
from numbering.migrations import current_revision, head_revision
from numbering.tasks.guard import consumer_alive, consumer_lock
from numbering.tasks.preflight import check_database

pytestmark = pytest.mark.integration


def test_keys_compare_byte_exact(mariadb_url: str) -> None:
    """utf8mb4_bin: two keys that differ in case are two requests (a case-insensitive
    collation would answer the second with the first one's number, or refuse it)."""
    numbers = Allocator(mariadb_url)
    try:
        numbers.create_sequence("invoices")
        assert numbers.next_value("invoices", key="Invoice:1") == 1
        assert numbers.next_value("invoices", key="invoice:1") == 2
        assert numbers.next_value("invoices", key="Invoice:1") == 1
        check_gapless(numbers.engine, "invoices", keys=["Invoice:1", "invoice:1"])
    finally:
        numbers.close()


def _lock_waiters(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM information_schema.innodb_trx "
                    "WHERE trx_state = 'LOCK WAIT'"
                )
            ).scalar_one()
        )


def test_a_copy_that_waited_sees_the_key_committed_meanwhile(mariadb_url: str) -> None:
    """At REPEATABLE READ a transaction that has already read keeps its first snapshot: a
    plain look-up after the counter's lock would miss the key that the transaction it
    waited for committed, and the copy would collide on the unique key. The look-up is a
    locking read, so the copy gets the same number."""
    engine = create_engine(mariadb_url, isolation_level="REPEATABLE READ")
    Allocator(engine).create_sequence("invoices")
    got: dict[str, object] = {}
    with engine.connect() as first:
        first.begin()
        got["first"] = allocate(first, "invoices", key="k")

        def copy() -> None:
            with engine.connect() as second, second.begin():
                second.execute(sa.text("SELECT COUNT(*) FROM numbering_ledger"))  # snapshot
                try:
                    got["copy"] = allocate(second, "invoices", key="k")
                except Exception as exc:  # asserted below
                    got["copy"] = exc

        waiter = threading.Thread(target=copy)
        waiter.start()
        deadline = time.monotonic() + 30
        while _lock_waiters(engine) == 0:
            assert time.monotonic() < deadline, f"the copy never waited for the lock: {got}"
            # Not faster: InnoDB refreshes innodb_trx only when it was not read for 0.1 s.
            time.sleep(0.2)
        first.commit()
    waiter.join(30)
    assert got == {"first": 1, "copy": 1}
    check_gapless(engine, "invoices", keys=["k"])
    engine.dispose()


def test_nowait_is_lock_not_available(mariadb_url: str) -> None:
    """MariaDB answers NOWAIT with error 1205 (MySQL 8.0 with 3572): both are
    LockNotAvailable."""
    engine = create_engine(mariadb_url)
    Allocator(engine).create_sequence("invoices")
    with engine.connect() as holder, holder.begin():
        allocate(holder, "invoices", key="holder")
        with engine.connect() as other, other.begin(), pytest.raises(LockNotAvailable):
            allocate(other, "invoices", key="impatient", nowait=True)
    check_gapless(engine, "invoices", keys=["holder"])
    engine.dispose()


def test_the_start_up_check_reads_innodb_settings(mariadb_url: str) -> None:
    engine = create_engine(mariadb_url)
    found = check_database(engine)
    assert found.problems == []
    assert "MariaDB" in found.facts[0]
    # A numbering table on another storage engine is refused, by name.
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE numbering_scratch (id INT) ENGINE=MyISAM"))
    [problem] = check_database(engine).problems
    assert "numbering_scratch uses the MyISAM storage engine; numbering needs InnoDB" in problem
    engine.dispose()


def test_the_ledger_is_append_only(mariadb_url: str) -> None:
    numbers = Allocator(mariadb_url)
    try:
        numbers.create_sequence("invoices")
        numbers.next_value("invoices", key="k")
        for statement in (
            "DELETE FROM numbering_ledger",
            "UPDATE numbering_ledger SET value = 7",
        ):
            with (
                pytest.raises(sa.exc.DBAPIError, match="append-only"),
                numbers.engine.begin() as conn,
            ):
                conn.execute(sa.text(statement))
        numbers.void("invoices", key="k", reason="typo")  # the one change allowed
        check_gapless(numbers.engine, "invoices", keys=["k"])
    finally:
        numbers.close()


def test_the_worker_numbers_on_mariadb_with_a_standby(
    mariadb_url: str, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """The queue path end to end: a worker and a standby (the consumer lock is GET_LOCK,
    which the server releases when the holder's session dies), client processes, the
    active worker killed mid-load, the standby finishing; every history checks out."""
    stack = Stack(mariadb_url, *redis_urls, tmp_path)
    try:
        Allocator(mariadb_url).create_sequence("invoices")
        active = stack.worker("--sequence", "invoices")
        stack.worker("--sequence", "invoices", active=False)  # the standby
        clients = stack.start_clients([("invoices", f"c{c}", 100) for c in range(2)])
        stack.wait_for_numbers("invoices", 50)
        active.kill()
        clients.wait()
        stack.check("invoices", [f"c{c}:{i}" for c in range(2) for i in range(100)])
        assert "active consumer of numbering.invoices" in stack.workers[1].output()
        status = stack.numbering("status")
        assert status.returncode == 0, status.stderr
        assert "alive" in status.stdout
    finally:
        stack.close()


def test_concurrent_init_db_from_an_empty_database(mariadb_url: str) -> None:
    """init-db from four threads at once on an empty database: one migrates, the others
    wait for its GET_LOCK and find nothing left to do; the lock is released after."""
    base = make_url(mariadb_url)
    empty = base.set(database=f"{base.database}_empty")
    admin = create_engine(base.set(database=""), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{empty.database}` CHARACTER SET utf8mb4")
    try:
        url = empty.render_as_string(hide_password=False)
        at_once(4, lambda _: init_db(create_engine(url, poolclass=sa.pool.NullPool)))
        engine = create_engine(url)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:  # released: another session takes it at once
            taken = conn.execute(sa.text(f"SELECT GET_LOCK({MIGRATION_LOCK}, 0)"))
            assert taken.scalar() == 1
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{empty.database}`")
        admin.dispose()


def test_numbering_sessions_end_an_idle_transaction(mariadb_url: str) -> None:
    """NUMBERING_IDLE_TRANSACTION_TIMEOUT becomes MariaDB's idle_transaction_timeout on
    numbering's sessions: a frozen process cannot hold a counter's lock for ever."""
    engine = create_engine(mariadb_url, idle_transaction_timeout=1)
    Allocator(engine).create_sequence("invoices")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT @@idle_transaction_timeout")).scalar() == 1
        session = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
        conn.rollback()
        conn.begin()
        allocate(conn, "invoices", key="frozen")  # holds the counter's lock, then idles
        # Watched from another session (a statement here would end the idleness).
        deadline = time.monotonic() + 30
        with engine.connect() as watcher:
            while watcher.execute(
                sa.text("SELECT COUNT(*) FROM information_schema.processlist WHERE id = :id"),
                {"id": session},
            ).scalar():
                assert time.monotonic() < deadline, "the idle session was never ended"
                watcher.rollback()
                time.sleep(0.2)
        with pytest.raises(sa.exc.DBAPIError):
            conn.execute(sa.text("SELECT 1")).scalar()
    # The lock went with the session: the next request is served, and "frozen" never
    # committed.
    numbers = Allocator(engine)
    assert numbers.next_value("invoices", key="next") == 1
    check_gapless(engine, "invoices", keys=["next"])
    engine.dispose()


def test_a_connection_lost_while_setting_the_isolation_level_is_retried(
    mariadb_url: str,
) -> None:
    """The level is set with a statement of its own (SET TRANSACTION ISOLATION LEVEL,
    before the transaction's first); a link cut there is a lost connection, retried like
    any other, not a driver error that escapes (seen in a fault test: the worker's
    consumer started over with a traceback)."""
    url = make_url(mariadb_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 3306)
    proxied = url.set(host="127.0.0.1", port=proxy.port)
    # An engine of the caller's (sessions at the server's REPEATABLE READ), so that each
    # SERIALIZABLE transaction starts with SET TRANSACTION.
    numbers = Allocator(create_engine(proxied), isolation_level="SERIALIZABLE", retry=FAST_RETRY)
    try:
        numbers.create_sequence("invoices")
        proxy.cut_after(b"ISOLATION LEVEL")
        assert numbers.run(lambda conn: allocate(conn, "invoices", key="k")) == 1
        assert proxy.cuts == 1
        assert numbers.stats.as_dict().get("ConnectionLost", 0) >= 1
        check_gapless(numbers.engine, "invoices", keys=["k"])
    finally:
        numbers.close()
        proxy.close()


def test_a_commit_whose_reply_is_lost_is_resolved_by_the_key(mariadb_url: str) -> None:
    """The COMMIT commits, its reply never arrives: the retry finds the key assigned and
    answers with that number, never a second one."""
    url = make_url(mariadb_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 3306)
    numbers = Allocator(url.set(host="127.0.0.1", port=proxy.port), retry=FAST_RETRY)
    try:
        numbers.create_sequence("invoices")
        assert numbers.next_value("invoices", key="before") == 1
        proxy.cut_after(b"\x03COMMIT")
        [outcome] = numbers.assign("invoices", [Request("k")])
        # resent: the first attempt's COMMIT did commit, and the retry found the key.
        assert (outcome.value, outcome.resent) == (2, True)
        assert proxy.cuts == 1
        assert numbers.stats.as_dict().get("ConnectionLost", 0) == 1
        assert numbers.next_value("invoices", key="after") == 3
        check_gapless(numbers.engine, "invoices", keys=["before", "k", "after"])
    finally:
        numbers.close()
        proxy.close()


@pytest.mark.parametrize("sessions", ["READ COMMITTED", "REPEATABLE READ"])
@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ"])
def test_transactions_run_at_the_level_asked(mariadb_url: str, sessions: str, level: str) -> None:
    """An allocator's sessions start at its level (no statement per transaction); a
    transaction at another level gets SET TRANSACTION (not SQLAlchemy's per-checkout
    SET SESSION and COMMIT). A plain read at READ COMMITTED sees what another
    transaction committed meanwhile; at REPEATABLE READ it keeps its first snapshot."""
    numbers = Allocator(mariadb_url, isolation_level=sessions)
    other = create_engine(mariadb_url)
    try:
        with other.begin() as conn:
            conn.execute(sa.text("CREATE TABLE scratch (id INT) ENGINE=InnoDB"))
        count = sa.text("SELECT COUNT(*) FROM scratch")

        def read_twice(conn: sa.Connection) -> tuple[int, int]:
            first = conn.execute(count).scalar_one()
            with other.begin() as outside:
                outside.execute(sa.text("INSERT INTO scratch VALUES (1)"))
            return first, conn.execute(count).scalar_one()

        first, second = numbers.run(read_twice, isolation_level=level)
        assert (first, second) == ((0, 1) if level == "READ COMMITTED" else (0, 0))
        # The session's own level is untouched by a transaction at another level.
        with numbers.engine.connect() as conn:
            in_session = conn.execute(sa.text("SELECT @@tx_isolation")).scalar()
        assert in_session == sessions.replace(" ", "-")
    finally:
        numbers.close()
        other.dispose()


def test_consumer_locks_are_per_database(mariadb_url: str) -> None:
    """GET_LOCK names are server-wide: a worker of another database on the same server
    (staging beside production) must not hold this database's queues on standby. Seen in
    CI before the lock names held the database: a test's worker stood by for ever on a
    lock that some session of another database still held."""
    base = make_url(mariadb_url)
    other = base.set(database=f"{base.database}_other")
    admin = create_engine(base.set(database=""), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{other.database}` CHARACTER SET utf8mb4")
    engines = [create_engine(url) for url in (base, other)]
    try:
        locks = [consumer_lock(engine, "numbering.invoices") for engine in engines]
        assert [lock.try_acquire() for lock in locks] == [True, True]
        assert consumer_alive(engines[1], "numbering.invoices")
        rival = consumer_lock(engines[0], "numbering.invoices")
        assert not rival.try_acquire()  # the same database: one consumer
        credit_notes = consumer_lock(engines[0], "numbering.credit-notes")
        assert credit_notes.try_acquire()  # another queue of the same database
        credit_notes.release()
        locks[0].release()
        assert not consumer_alive(engines[0], "numbering.invoices")
        assert rival.try_acquire()
        rival.release()
        locks[1].release()
    finally:
        for engine in engines:
            engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{other.database}`")
        admin.dispose()
