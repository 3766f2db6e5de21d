"""allocate()'s one-step path: a request with a fresh key on a plain counter.

The counter is locked and written together with the ledger row (PostgreSQL: one
statement; MariaDB: two, in one round trip), so nothing runs between the lock and the
writes. What is not plain (a period, a format, a frozen sequence, a block past the
maximum or across the loop) must reach the general path and end exactly as before, and
every result must satisfy the gapless invariant read from the raw tables.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from ledger_check import check_gapless
from sqlalchemy.engine import Engine
from together import at_once

from numbering import (
    Allocator,
    SequenceExhaustedError,
    allocate,
    create_engine,
    create_sequence,
)
from numbering.errors import InvalidCountError, SequenceFrozenError
from numbering.plan import Request, new_key
from numbering.validation import MAX_INT64

#: Round trips the one-step path makes, by engine (SQLite has none: general path). On
#: MariaDB through mysqlclient its two statements travel together.
ONE_STEP = {"postgresql": 1, "mysql": 1}


class Counted:
    """The statements sent on ``engine`` (each cursor execute), from a listener."""

    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)


@pytest.fixture
def counted(engine: Engine) -> Iterator[Counted]:
    seen = Counted(engine)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", seen._seen)


def take(engine: Engine, counted: Counted, name: str, **kwargs: Any) -> tuple[Any, int]:
    """allocate() in a transaction of its own: what it returned and how many statements
    it sent (BEGIN and COMMIT are not statements here)."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT 1"))  # the connection's own set-up is done
        before = len(counted.statements)
        taken = allocate(conn, name, **kwargs)
        return taken, len(counted.statements) - before


def ledger(engine: Engine, name: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        count = conn.dialect.identifier_preparer.quote_identifier("count")
        rows = conn.execute(
            sa.text(
                f"SELECT l.cycle, l.value, l.{count}, l.status, l.formatted, l.reference "
                "FROM numbering_ledger l JOIN numbering_sequence s ON s.id = l.sequence_id "
                "WHERE s.name = :name ORDER BY l.id"
            ),
            {"name": name},
        )
        return [tuple(row) for row in rows]


def one_step(engine: Engine) -> int | None:
    return ONE_STEP.get(engine.dialect.name)


def test_a_plain_counter_takes_one_step(engine: Engine, counted: Counted) -> None:
    Allocator(engine).create_sequence("invoices", initial_value=1000)
    first, sent = take(engine, counted, "invoices", reference={"total": "9.90"})
    assert first == 1000
    if one_step(engine):
        assert sent == one_step(engine), counted.statements[-sent:]
    block, _ = take(engine, counted, "invoices", count=3)
    assert block == range(1001, 1004)
    assert take(engine, counted, "invoices", count=1)[0] == 1004
    rows = ledger(engine, "invoices")
    assert [row[:5] for row in rows] == [
        (0, 1000, 1, "assigned", None),
        (0, 1001, 3, "assigned", None),
        (0, 1004, 1, "assigned", None),
    ]
    reference = rows[0][5]  # a dict, or JSON text where the driver leaves it so
    assert (json.loads(reference) if isinstance(reference, str) else reference) == {"total": "9.90"}
    assert len(check_gapless(engine, "invoices")) == 3
    assert Allocator(engine).last_value("invoices") == 1004


def test_references_of_every_kind_are_stored_as_given(engine: Engine, counted: Counted) -> None:
    """The one-step path binds the reference itself (as JSON text on MariaDB through
    mysqlclient): read back through the column's type, each is what was given."""
    from numbering.schema import ledger as ledger_table

    Allocator(engine).create_sequence("invoices")
    references = [{"invoice": 1, "lines": [1, 2]}, [1, "two"], "text with 'quotes'", 3.5, None]
    for reference in references:
        take(engine, counted, "invoices", reference=reference)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(ledger_table.c.reference).order_by(ledger_table.c.value)
        ).scalars()
        assert list(stored) == references
    check_gapless(engine, "invoices")


def test_a_looping_counter_wraps_into_the_next_cycle(engine: Engine, counted: Counted) -> None:
    Allocator(engine).create_sequence("seconds", initial_value=0, reset_value=3)
    taken = [take(engine, counted, "seconds") for _ in range(7)]
    assert [value for value, _ in taken] == [0, 1, 2, 0, 1, 2, 0]
    if one_step(engine):
        assert {sent for _, sent in taken} == {one_step(engine)}
    assert [row[:2] for row in ledger(engine, "seconds")] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)
    ]  # fmt: skip
    check_gapless(engine, "seconds")
    # Blocks on a looping counter take the general path, with its refusals.
    assert take(engine, counted, "seconds", count=2)[0] == range(1, 3)
    assert take(engine, counted, "seconds", count=2)[0] == range(0, 2)  # cycle 3
    with pytest.raises(InvalidCountError, match="does not fit in the 1 value"):
        take(engine, counted, "seconds", count=2)
    assert take(engine, counted, "seconds")[0] == 2
    check_gapless(engine, "seconds")


def test_the_maximum_is_enforced_with_numbering_s_error(engine: Engine, counted: Counted) -> None:
    Allocator(engine).create_sequence("small", max_value=3)
    assert take(engine, counted, "small", count=2)[0] == range(1, 3)
    with pytest.raises(SequenceExhaustedError, match="sequence exhausted"):
        take(engine, counted, "small", count=2)
    assert take(engine, counted, "small")[0] == 3
    with pytest.raises(SequenceExhaustedError):
        take(engine, counted, "small")
    Allocator(engine).create_sequence("huge", initial_value=MAX_INT64 - 1)
    assert take(engine, counted, "huge")[0] == MAX_INT64 - 1
    assert take(engine, counted, "huge")[0] == MAX_INT64
    with pytest.raises(SequenceExhaustedError, match=str(MAX_INT64)):  # not an overflow
        take(engine, counted, "huge")
    check_gapless(engine, "small")
    check_gapless(engine, "huge")


def test_what_is_not_plain_takes_the_general_path(engine: Engine, counted: Counted) -> None:
    numbers = Allocator(engine)
    numbers.create_sequence("inv", format="INV-{year}-{number:04d}")
    numbers.create_sequence("monthly", period="month")
    numbers.create_sequence("closed")
    numbers.freeze("closed")
    assert take(engine, counted, "inv", date="2026-03-01")[0] == 1
    assert ledger(engine, "inv")[0][4] == "INV-2026-0001"
    assert take(engine, counted, "monthly", date="2026-03-01")[0] == 1
    assert take(engine, counted, "monthly", date="2026-04-01")[0] == 1
    with pytest.raises(SequenceFrozenError):
        take(engine, counted, "closed")
    assert ledger(engine, "closed") == []
    check_gapless(engine, "inv")


def test_a_transaction_holds_the_counter_until_it_ends(server_url: str) -> None:
    """The caller's transaction keeps the counter's lock: a second caller waits for it,
    then gets the next value after a commit and the same one after a rollback. (On
    SQLite the lock is the database's write lock: test_concurrency.)"""
    engine = create_engine(server_url)
    Allocator(engine).create_sequence("invoices")
    for ending in ("commit", "rollback"):
        got: list[int] = []
        with engine.connect() as conn:
            trans = conn.begin()
            mine = allocate(conn, "invoices")
            second = threading.Thread(target=lambda got=got: got.append(_one(engine)))
            second.start()
            second.join(0.5)
            assert second.is_alive()  # waiting for this transaction
            assert not got
            trans.commit() if ending == "commit" else trans.rollback()
        second.join(30)
        assert got == [mine + 1 if ending == "commit" else mine]
    assert len(check_gapless(engine, "invoices")) == 3  # 1, 2 and the second 3
    engine.dispose()


def _one(engine: Engine) -> int:
    with engine.begin() as conn:
        value: int = allocate(conn, "invoices")
        return value


def test_threads_on_one_counter_stay_gapless(engine: Engine) -> None:
    """Eight threads, each taking values and blocks in transactions of its own, some
    rolled back; the ledger ends gapless and holds exactly the committed ones."""
    with engine.begin() as conn:
        create_sequence(conn, "invoices", initial_value=0)
    kept: list[int] = []
    lock = threading.Lock()

    def work(thread: int) -> None:
        for turn in range(15):
            count = 1 + (thread + turn) % 3
            with engine.connect() as conn:
                trans = conn.begin()
                taken = allocate(conn, "invoices", count=count)
                values = list(taken) if isinstance(taken, range) else [taken]
                if turn % 5 == 4:
                    trans.rollback()
                    continue
                trans.commit()
            with lock:
                kept.extend(values)

    at_once(8, work, timeout=180)
    assert sorted(kept) == list(range(len(kept)))
    by_key = check_gapless(engine, "invoices")
    assert sorted(v for values in by_key.values() for v in values) == sorted(kept)


def test_mariadb_reads_only_the_named_counter(mariadb_url: str) -> None:
    """InnoDB locks every row its UPDATE reads through the index it picks: the one-step
    UPDATE must offer it the name's unique index alone (with "parent_id IS NULL" in its
    WHERE, MariaDB picked that index on a small table and locked every sequence:
    deadlocks in `make bench-mariadb`)."""
    from numbering.backends.mysql import _TAKE_PLAIN_ONE_TRIP, _TAKE_PLAIN_UPDATE
    from numbering.chaining import chain_parts

    engine = create_engine(mariadb_url)
    numbers = Allocator(engine)
    for i in range(5):
        numbers.create_sequence(f"s{i}")
    params = {"name": "s0", "count": 1, "now": "2026-12-07 00:00:00", "key": "k"}
    params.update(chain_parts(Request("k"), datetime.now(timezone.utc)))  # the row's record
    insert, update = _TAKE_PLAIN_ONE_TRIP.split(";\n")
    with engine.connect() as conn:
        conn.exec_driver_sql("SET @numbering_key = 'k'")  # as the INSERT leaves it
        inserting = conn.exec_driver_sql(f"EXPLAIN {insert}", {**params, "reference": None})
        plans = [
            conn.execute(sa.text(f"EXPLAIN {_TAKE_PLAIN_UPDATE}"), params).mappings().one(),
            conn.exec_driver_sql(f"EXPLAIN {update}", params).mappings().one(),
            *(plan for plan in inserting.mappings() if plan["table"] == "numbering_sequence"),
        ]
    assert len(plans) == 3
    for plan in plans:
        assert (plan["possible_keys"], plan["key"]) == ("uq_numbering_sequence_name",) * 2
    engine.dispose()


def test_different_counters_never_wait_for_each_other(server_url: str) -> None:
    """A transaction holding one sequence does not hold another: a caller of the other
    gets its number while the first is still open."""
    engine = create_engine(server_url)
    numbers = Allocator(engine)
    for i in range(12):
        numbers.create_sequence(f"s{i:02d}")
    numbers.create_sequence("monthly", period="month")  # a row with a parent_id too
    numbers.next_value("monthly")
    with engine.connect() as conn, conn.begin():
        assert allocate(conn, "s05") == 1
        others: list[int] = []
        thread = threading.Thread(
            target=lambda: others.extend(_take_each(engine, ["s00", "s07", "s11"]))
        )
        thread.start()
        thread.join(60)
        assert others == [1, 1, 1]  # done while s05's transaction is still open
    for name in ("s00", "s05", "s07", "s11"):
        check_gapless(engine, name)
    engine.dispose()


def _take_each(engine: Engine, names: list[str]) -> list[int]:
    taken = []
    for name in names:
        with engine.begin() as conn:
            taken.append(allocate(conn, name))
    return taken


def test_mariadb_separate_statements_agree(mariadb_url: str) -> None:
    """Through drivers without multi-statements (PyMySQL) the one-step path sends the
    UPDATE and the INSERT as two statements: the same blocks, loops and refusals."""
    from numbering.backends import backend_for
    from numbering.store import CoreStore

    engine = create_engine(mariadb_url)
    numbers = Allocator(engine)
    numbers.create_sequence("plain", initial_value=10)
    numbers.create_sequence("loop", initial_value=0, reset_value=2)
    numbers.create_sequence("small", max_value=1)

    def take(name: str, count: int = 1) -> tuple[int, int] | None:
        with engine.begin() as conn:
            store = CoreStore(conn, backend_for(conn))  # not the mysqlclient store
            return store.take_plain(name, Request(new_key(), count), datetime.now(timezone.utc))

    assert [take("plain"), take("plain", 3), take("plain")] == [(10, 0), (11, 0), (14, 0)]
    assert [take("loop") for _ in range(3)] == [(0, 0), (1, 0), (0, 1)]
    assert take("small") == (1, 0)
    assert take("small") is None  # exhausted: the general path says so
    for name in ("plain", "loop", "small"):
        check_gapless(engine, name)
    engine.dispose()
