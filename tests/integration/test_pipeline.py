"""Pipelined assignment transactions on PostgreSQL through psycopg2.

numbering's own transactions send BEGIN along with the lock and hold the ledger writes
back to go along with COMMIT (numbering.backends.psycopg2.run_pipelined). These tests pin down what
that must never change: the order of statements, what a failure leaves behind, and the
connection handed back to the pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import FAST_RETRY
from ledger_check import check_gapless
from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine

from numbering import Allocator, KeyReusedError, Request, assign, create_engine
from numbering.backends.psycopg2 import PIPELINE_OPTION, Pipeline
from numbering.errors import DatabaseError


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    # One pooled connection: every test reuses the connection its transaction had.
    engine = create_engine(pg_url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


@pytest.fixture
def numbers(engine: Engine) -> Allocator:
    numbers = Allocator(engine, retry=FAST_RETRY)
    numbers.create_sequence("invoices")
    return numbers


def sent_statements(engine: Engine) -> list[str]:
    """Every statement sent on ``engine`` from now on (one per round trip)."""
    sent: list[str] = []

    @event.listens_for(engine, "after_cursor_execute")
    def record(*args: Any) -> None:
        sent.append(args[2])

    return sent


def assert_connection_clean(engine: Engine) -> None:
    """The pooled connection is out of any transaction and back in transaction mode."""
    from psycopg2.extensions import TRANSACTION_STATUS_IDLE

    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        assert dbapi.autocommit is False
        assert dbapi.info.transaction_status == TRANSACTION_STATUS_IDLE
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar_one() == "read committed"


def assert_unlocked(engine: Engine, name: str) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(
            "SELECT 1 FROM numbering_sequence WHERE name = %(n)s FOR UPDATE NOWAIT", {"n": name}
        )
        conn.rollback()


def test_an_assignment_is_two_round_trips(numbers: Allocator, engine: Engine) -> None:
    sent = sent_statements(engine)
    outcomes = numbers.assign("invoices", [Request("a"), Request("b", 3)])
    assert [(o.value, o.count) for o in outcomes] == [(1, 1), (2, 3)]  # type: ignore[union-attr]
    assert len(sent) == 2, sent
    assert sent[0].startswith("BEGIN ISOLATION LEVEL READ COMMITTED;\nSELECT set_config(")
    assert "INSERT INTO numbering_ledger" in sent[1]
    assert sent[1].endswith("COMMIT")
    assert_connection_clean(engine)
    check_gapless(engine, "invoices", keys=["a", "b"])


def test_the_configured_isolation_level_begins_the_transaction(engine: Engine) -> None:
    numbers = Allocator(engine, isolation_level="SERIALIZABLE", retry=FAST_RETRY)
    numbers.create_sequence("invoices")
    sent = sent_statements(engine)
    assert numbers.next_value("invoices", key="a") == 1
    assert sent[0].startswith("BEGIN ISOLATION LEVEL SERIALIZABLE;")
    assert_connection_clean(engine)


def test_a_failure_after_the_lock_rolls_back_and_unlocks(
    numbers: Allocator, engine: Engine
) -> None:
    def work(conn: Connection) -> None:
        assign(conn, "invoices", [Request("a")])
        raise RuntimeError("the caller's bug")

    with pytest.raises(RuntimeError, match="the caller's bug"):
        numbers.run_assignment(work, describe="test")
    assert_connection_clean(engine)
    assert_unlocked(engine, "invoices")
    assert numbers.last_value("invoices") is None  # nothing was written
    assert numbers.next_value("invoices", key="b") == 1
    check_gapless(engine, "invoices", keys=["b"])


def test_a_held_write_that_fails_fails_the_commit(numbers: Allocator, engine: Engine) -> None:
    """Held-back SQL is sent with COMMIT; its error is the transaction's error, and
    nothing of the transaction is committed."""

    def work(conn: Connection) -> None:
        assign(conn, "invoices", [Request("a")])
        pipeline = conn.get_execution_options()[PIPELINE_OPTION]
        assert isinstance(pipeline, Pipeline)
        pipeline.hold("SELECT 1 / 0")

    with pytest.raises(DatabaseError, match="division by zero") as raised:
        numbers.run_assignment(work, describe="test")
    assert raised.value.sqlstate == "22012"
    assert_connection_clean(engine)
    assert_unlocked(engine, "invoices")
    assert numbers.last_value("invoices") is None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM numbering_ledger").scalar_one() == 0


def test_held_writes_go_before_any_later_statement(numbers: Allocator, engine: Engine) -> None:
    """A second sequence in the same transaction sees the first one's held writes: its
    key look-up finds a key the first sequence just assigned, and the period counter it
    creates (a SQLAlchemy Core statement, not numbering's plain SQL) goes after them."""
    numbers.create_sequence("yearly", period="year")

    def work(conn: Connection) -> list[Any]:
        first = assign(conn, "invoices", [Request("shared"), Request("a")])
        second = assign(conn, "yearly", [Request("shared"), Request("y")])
        return [*first, *second]

    sent = sent_statements(engine)
    a1, a2, b1, b2 = numbers.run_assignment(work, describe="test")
    assert (a1.value, a2.value) == (1, 2)
    assert isinstance(b1, KeyReusedError)
    assert b2.value == 1
    assert b2.period is not None
    assert "INSERT INTO numbering_ledger" in sent[1]  # invoices' writes, held until here
    assert "FOR UPDATE" in sent[1]  # ... went with yearly's lock and look-up
    assert sent[-1].endswith("COMMIT")
    assert_connection_clean(engine)
    check_gapless(engine, "invoices", keys=["shared", "a"])
    with engine.connect() as conn:
        periods = conn.exec_driver_sql(
            "SELECT count(*) FROM numbering_sequence WHERE period_key IS NOT NULL"
        ).scalar_one()
    assert periods == 1


def test_several_sequences_are_still_two_round_trips(numbers: Allocator, engine: Engine) -> None:
    """assign_many locks every sequence with one statement, in name order, and looks
    every key up with one; the writes of all of them go with COMMIT."""
    for name in ("zeta", "alpha", "Mid"):
        numbers.create_sequence(name)
    sent = sent_statements(engine)
    results = numbers.assign_many(
        {"zeta": [Request("z")], "invoices": [Request("i"), Request("j")], "alpha": [Request("a")],
         "Mid": [Request("m")]}
    )  # fmt: skip
    assert len(sent) == 2
    assert sent[0].count("FOR UPDATE") == 1
    assert 'ORDER BY name COLLATE "C" FOR UPDATE' in sent[0]
    assert sent[1].count("UPDATE numbering_sequence") == 1  # one for all four counters
    assert "FROM unnest(ARRAY[" in sent[1].split("UPDATE numbering_sequence")[1]
    assert sent[1].count("INSERT INTO numbering_ledger") == 1
    assert sent[1].endswith("COMMIT")
    assert {name: [o.value for o in os] for name, os in results.items()} == {  # type: ignore[union-attr]
        "zeta": [1], "invoices": [1, 2], "alpha": [1], "Mid": [1],
    }  # fmt: skip
    assert_connection_clean(engine)
    for name, keys in [("zeta", ["z"]), ("invoices", ["i", "j"]), ("alpha", ["a"]), ("Mid", ["m"])]:
        check_gapless(engine, name, keys=keys)


def test_sequences_are_locked_in_bytewise_name_order(engine: Engine) -> None:
    """The lock statement's row order is Python's sort order (what every other locker
    of several sequences uses), not the database's collation: 'B' before 'a'."""
    numbers = Allocator(engine, retry=FAST_RETRY)
    for name in ("a", "B", "0"):
        numbers.create_sequence(name)
    with engine.connect() as conn:
        order = (
            conn.exec_driver_sql(
                "SELECT name FROM numbering_sequence WHERE name = ANY(%(n)s) "
                'ORDER BY name COLLATE "C" FOR UPDATE',
                {"n": ["a", "B", "0"]},
            )
            .scalars()
            .all()
        )
        conn.rollback()
    assert order == sorted(["a", "B", "0"]) == ["0", "B", "a"]


def test_references_with_percent_signs_and_quotes_survive(
    numbers: Allocator, engine: Engine
) -> None:
    reference = {"note": "50% off; 'quoted' %(name)s %s \\ \"x\"", "n": [1, None]}
    numbers.assign("invoices", [Request("a", 1, reference), Request("b", 1, "%%")])
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT reference FROM numbering_ledger ORDER BY value")
        ).scalars()
        assert list(stored) == [reference, "%%"]
