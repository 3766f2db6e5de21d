"""Allocation against real databases: PostgreSQL and SQLite files."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from conftest import FAST_RETRY
from ledger_check import check_gapless
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from together import at_once

from numbering import (
    Allocator,
    InvalidRequestError,
    KeyReusedError,
    Request,
    SequenceExhaustedError,
    SequenceExistsError,
    SequenceNotFoundError,
    allocate,
    create_sequence,
)
from numbering.errors import InvalidCountError, SequenceFrozenError
from numbering.sequences import archive_sequence
from numbering.validation import MAX_INT64


@pytest.fixture
def numbers(engine: Engine) -> Allocator:
    return Allocator(engine, retry=FAST_RETRY)


def ledger_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM numbering_ledger")).scalar_one())


def test_values_start_at_initial_and_increase(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    numbers.create_sequence("cases", initial_value=1000)
    assert [numbers.next_value("invoices") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert [numbers.next_value("cases") for _ in range(2)] == [1000, 1001]
    assert numbers.last_value("invoices") == 5
    assert len(check_gapless(engine, "invoices")) == 5
    assert len(check_gapless(engine, "cases")) == 2


def test_same_key_gets_same_value(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    first = numbers.next_block("invoices", key="invoice:1")
    other = numbers.next_value("invoices", key="invoice:2")
    again = numbers.next_block("invoices", key="invoice:1")
    assert (first.value, first.resent) == (1, False)
    assert (again.value, again.resent) == (1, True)
    assert other == 2
    assert check_gapless(engine, "invoices", keys=["invoice:1", "invoice:2"]) == {
        "invoice:1": [1],
        "invoice:2": [2],
    }


def test_resend_racing_an_open_transaction_waits_and_gets_its_value(
    numbers: Allocator, engine: Engine
) -> None:
    """Lock first, then look up: a copy of a request arriving while the first copy's
    transaction is still open waits for it and returns its value, without retrying."""
    numbers.create_sequence("invoices")
    events: list[str] = []
    result: dict[str, int] = {}

    def resend() -> None:
        events.append("resend started")
        result["value"] = numbers.next_value("invoices", key="invoice:7")
        events.append("resend returned")

    with Session(engine) as session, session.begin():
        assert allocate(session, "invoices", key="invoice:7") == 1
        thread = threading.Thread(target=resend)
        thread.start()
        time.sleep(0.5)  # the resend is now waiting for the sequence lock
        events.append("first committed")
    thread.join(10)

    assert events == ["resend started", "first committed", "resend returned"]
    assert result["value"] == 1
    assert numbers.stats.total == 0
    check_gapless(engine, "invoices", keys=["invoice:7"])


def test_concurrent_copies_of_one_request_get_one_value(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    results: list[int] = []

    def request(i: int) -> None:
        results.append(numbers.next_value("invoices", key="invoice:dup"))
        results.append(numbers.next_value("invoices", key=f"invoice:{i}"))

    at_once(8, request)

    by_key = check_gapless(
        engine, "invoices", keys=["invoice:dup", *(f"invoice:{i}" for i in range(8))]
    )
    assert results.count(by_key["invoice:dup"][0]) == 8
    assert ledger_rows(engine) == 9


def test_rolled_back_transaction_consumes_nothing(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    with Session(engine) as session:
        with session.begin():
            assert allocate(session, "invoices", key="kept") == 1
        session.begin()
        assert allocate(session, "invoices", key="dropped") == 2
        session.rollback()
    assert numbers.next_value("invoices", key="next") == 2
    check_gapless(engine, "invoices", keys=["kept", "next"])


def test_allocate_never_commits(engine: Engine, numbers: Allocator) -> None:
    numbers.create_sequence("invoices")
    with engine.connect() as conn:
        with conn.begin():
            assert allocate(conn, "invoices", key="a") == 1
            assert allocate(conn, "invoices", count=3) == range(2, 5)
            assert conn.in_transaction()
        assert numbers.last_value("invoices") == 4


def test_looping_sequence_wraps_like_django_sequences(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("seconds", initial_value=0, reset_value=3)
    blocks = [numbers.next_block("seconds") for _ in range(7)]
    assert [b.value for b in blocks] == [0, 1, 2, 0, 1, 2, 0]
    assert [b.cycle for b in blocks] == [0, 0, 0, 1, 1, 1, 2]
    check_gapless(engine, "seconds")
    assert numbers.sequence("seconds").cycle == 2


def test_blocks_are_contiguous_and_do_not_overlap(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    assert numbers.next_values("invoices", 5, key="b1") == range(1, 6)
    assert numbers.next_value("invoices") == 6
    assert numbers.next_values("invoices", 5, key="b1") == range(1, 6)  # resent
    ranges: list[range] = []

    def take(i: int) -> None:
        for j in range(20):
            ranges.append(numbers.next_values("invoices", 1 + (i + j) % 7, key=f"t{i}-{j}"))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    values = sorted(v for r in ranges for v in r)
    assert values == list(range(7, 7 + len(values)))
    check_gapless(engine, "invoices")


def test_block_that_would_straddle_the_loop_is_refused(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("loop", initial_value=1, reset_value=6)
    assert numbers.next_values("loop", 3) == range(1, 4)
    with pytest.raises(InvalidCountError, match="does not fit in the 2 value"):
        numbers.next_values("loop", 3)
    with pytest.raises(InvalidCountError, match="loops every 5 values"):
        numbers.next_values("loop", 6)
    assert numbers.next_values("loop", 2) == range(4, 6)
    assert numbers.next_values("loop", 3).start == 1
    check_gapless(engine, "loop")


def test_exhausted_sequence_raises_and_writes_nothing(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("small", max_value=3)
    assert numbers.next_values("small", 2) == range(1, 3)
    with pytest.raises(SequenceExhaustedError, match="sequence exhausted"):
        numbers.next_values("small", 2)
    assert numbers.next_value("small") == 3
    with pytest.raises(SequenceExhaustedError):
        numbers.next_value("small", key="late")
    assert numbers.last_value("small") == 3
    check_gapless(engine, "small")
    assert ledger_rows(engine) == 2


def test_values_reach_two_to_the_63_minus_1(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("huge", initial_value=MAX_INT64 - 1)
    assert numbers.next_value("huge") == MAX_INT64 - 1
    assert numbers.next_value("huge") == MAX_INT64
    with pytest.raises(SequenceExhaustedError, match=str(MAX_INT64)):
        numbers.next_value("huge")
    check_gapless(engine, "huge")


def test_unknown_sequence_is_a_clear_error(numbers: Allocator, engine: Engine) -> None:
    with pytest.raises(SequenceNotFoundError, match="'nope' does not exist"):
        numbers.next_value("nope", key="k")
    assert ledger_rows(engine) == 0


def test_key_reused_on_another_sequence_or_count(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    numbers.create_sequence("credit-notes")
    numbers.next_value("invoices", key="doc:1")
    with pytest.raises(KeyReusedError, match="another sequence"):
        numbers.next_value("credit-notes", key="doc:1")
    with pytest.raises(KeyReusedError, match="block of 1 value"):
        numbers.next_values("invoices", 2, key="doc:1")
    assert numbers.last_value("credit-notes") is None
    check_gapless(engine, "invoices", keys=["doc:1"])


def test_invalid_request_in_a_batch_fails_alone(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("invoices")
    numbers.create_sequence("other")
    numbers.next_value("other", key="taken")
    outcomes = numbers.assign(
        "invoices",
        [Request("a"), Request("taken"), Request("b", count=3), Request("a"), Request("c")],
    )
    a, taken, b, a_again, c = outcomes
    assert isinstance(taken, KeyReusedError)
    assert [(o.value, o.count) for o in (a, b, c)] == [(1, 1), (2, 3), (5, 1)]  # type: ignore[union-attr]
    assert a_again == a.__class__(a.sequence, "a", 1, 1, 0, resent=True)  # type: ignore[union-attr]
    check_gapless(engine, "invoices", keys=["a", "b", "c"])


def test_several_sequences_in_one_pass(numbers: Allocator, engine: Engine) -> None:
    """assign_many: each sequence numbered on its own counter; what fails a sequence (an
    unknown or invalid name, a frozen sequence) fails its requests alone; a key asked for
    on two sequences goes to the first by name, exactly as if sent one after the other."""
    numbers.create_sequence("a-invoices")
    numbers.create_sequence("b-credit", initial_value=100)
    numbers.create_sequence("c-yearly", period="year")
    numbers.create_sequence("d-frozen")
    numbers.freeze("d-frozen")
    numbers.next_value("b-credit", key="old")
    results = numbers.assign_many(
        {
            "c-yearly": [Request("y1", date="2026-05-01"), Request("shared")],
            "b-credit": [Request("shared"), Request("b1", 2), Request("old"), Request("b1", 2)],
            "nope": [Request("n1")],
            "bad/name": [Request("x1")],
            "d-frozen": [Request("f1")],
            "a-invoices": [Request("a1"), Request("old")],
            "empty": [],
        }
    )
    assert list(results) == [
        "c-yearly", "b-credit", "nope", "bad/name", "d-frozen", "a-invoices", "empty",
    ]  # fmt: skip
    a1, a_old = results["a-invoices"]
    assert (a1.value, a1.resent) == (1, False)  # type: ignore[union-attr]
    assert isinstance(a_old, KeyReusedError)
    assert "another sequence" in str(a_old)
    shared, b1, b_old, b1_again = results["b-credit"]
    assert [(o.value, o.count) for o in (shared, b1)] == [(101, 1), (102, 2)]  # type: ignore[union-attr]
    assert (b_old.value, b_old.resent) == (100, True)  # type: ignore[union-attr]
    assert (b1_again.value, b1_again.resent) == (102, True)  # type: ignore[union-attr]
    y1, y_shared = results["c-yearly"]
    assert (y1.value, y1.period) == (1, "2026")  # type: ignore[union-attr]
    assert isinstance(y_shared, KeyReusedError)
    assert "another sequence" in str(y_shared)
    [missing] = results["nope"]
    assert isinstance(missing, SequenceNotFoundError)
    [bad] = results["bad/name"]
    assert isinstance(bad, InvalidRequestError)
    [frozen] = results["d-frozen"]
    assert isinstance(frozen, SequenceFrozenError)
    assert results["empty"] == []
    check_gapless(engine, "a-invoices", keys=["a1"])
    check_gapless(engine, "b-credit", keys=["old", "shared", "b1"])
    assert numbers.last_value("d-frozen") is None
    # Every counter the pass moved was written (on psycopg2, by one joined UPDATE).
    assert [numbers.last_value(name) for name in ("a-invoices", "b-credit")] == [1, 103]
    assert [numbers.next_value(name) for name in ("a-invoices", "b-credit")] == [2, 104]
    # The same batch again: every request that was assigned is a resend now.
    again = numbers.assign_many({"b-credit": [Request("shared")], "a-invoices": [Request("a1")]})
    assert [o.resent for os in again.values() for o in os] == [True, True]  # type: ignore[union-attr]


def test_create_sequence_rules(numbers: Allocator) -> None:
    numbers.create_sequence("invoices", initial_value=10)
    with pytest.raises(SequenceExistsError):
        numbers.create_sequence("invoices", initial_value=10)
    assert numbers.create_sequence("invoices", initial_value=10, exist_ok=True).initial_value == 10
    with pytest.raises(SequenceExistsError, match="already exists with initial_value=10"):
        numbers.create_sequence("invoices", initial_value=1, exist_ok=True)
    with pytest.raises(InvalidRequestError, match="reset_value"):
        numbers.create_sequence("bad", initial_value=5, reset_value=5)
    assert [s.name for s in numbers.sequences()] == ["invoices"]


def test_concurrent_creation_of_one_sequence(engine: Engine) -> None:
    numbers = Allocator(engine, retry=FAST_RETRY)
    at_once(6, lambda _: numbers.create_sequence("invoices", exist_ok=True))
    assert [s.name for s in numbers.sequences()] == ["invoices"]


def test_in_session_api_works_with_orm_sessions(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        create_sequence(session, "invoices")
    with Session(engine) as session, session.begin():
        assert allocate(session, "invoices", key="k", reference={"invoice": 1}) == 1
    with Session(engine) as session, session.begin():
        assert allocate(session, "invoices", key="k") == 1
    check_gapless(engine, "invoices", keys=["k"])


def test_batch_rows_are_stored_exactly_by_either_store(numbers: Allocator, engine: Engine) -> None:
    """PostgreSQL through psycopg2 takes the plain-SQL store (two statements a round
    trip); SQLite the Core one. Both must write the same ledger rows: references of every
    JSON kind, formatted numbers, counters, and resends answered from the ledger."""
    from numbering.backends.psycopg2 import Psycopg2Store
    from numbering.schema import ledger
    from numbering.store import CoreStore, store_for

    with engine.connect() as conn:
        store = store_for(conn)
    from numbering.backends.mysql import MysqldbStore

    expected_store = {"postgresql": Psycopg2Store, "mysql": MysqldbStore}.get(
        engine.dialect.name, CoreStore
    )
    assert type(store) is expected_store

    numbers.create_sequence("invoices", format="INV-{number:04d}", initial_value=7)
    references = [{"invoice": 1, "lines": [1, 2]}, [1, "two"], "text with 'quotes'", 3.5, None]
    requests = [Request(f"k{i}", 1 + i, ref) for i, ref in enumerate(references)]
    outcomes = numbers.assign("invoices", requests)
    assert [(o.value, o.count, o.formatted) for o in outcomes] == [  # type: ignore[union-attr]
        (7, 1, "INV-0007"), (8, 2, "INV-0008"), (10, 3, "INV-0010"),
        (13, 4, "INV-0013"), (17, 5, "INV-0017"),
    ]  # fmt: skip
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(ledger.c.request_key, ledger.c.value, ledger.c.count, ledger.c.reference,
                      ledger.c.formatted, ledger.c.status).order_by(ledger.c.value)
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [
        (f"k{i}", o.value, o.count, ref, o.formatted, "assigned")  # type: ignore[union-attr]
        for i, (o, ref) in enumerate(zip(outcomes, references, strict=True))
    ]
    assert numbers.last_value("invoices") == 21

    again = numbers.assign("invoices", [*requests[:2], Request("k9")])
    assert [(o.value, o.resent) for o in again] == [(7, True), (8, True), (22, False)]  # type: ignore[union-attr]
    check_gapless(engine, "invoices", keys=[r.key for r in requests] + ["k9"])


def test_several_counter_updates_for_one_counter_leave_the_last(pg_url: str) -> None:
    """The psycopg2 store writes several counters with one joined UPDATE; should a pass
    ever hold two updates of one counter, the last must win, as it did when each was an
    UPDATE of its own (a join would apply an arbitrary one of the two)."""
    from datetime import datetime, timezone

    from numbering import create_engine
    from numbering.backends import backend_named
    from numbering.backends.psycopg2 import Psycopg2Store
    from numbering.store import CounterUpdate

    engine = create_engine(pg_url)
    numbers = Allocator(engine)
    for name in ("one", "two"):
        numbers.create_sequence(name)
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                sa.text(
                    "SELECT id FROM numbering_sequence WHERE name IN ('one', 'two') ORDER BY name"
                )
            ).scalars()
        )
        # A plan under which the join meets the first of the two rows first.
        conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
        conn.exec_driver_sql("SET LOCAL enable_mergejoin = off")
        updates = [CounterUpdate(ids[0], 7, 0), CounterUpdate(ids[1], 3, 0)]
        updates += [CounterUpdate(ids[0], 5, 0)]
        Psycopg2Store(conn, backend_named("postgresql")).write(
            updates, [], datetime.now(timezone.utc)
        )
    assert [numbers.last_value(name) for name in ("one", "two")] == [5, 3]
    engine.dispose()


# Names django-sequences takes and numbering's first rules refused: each its own sequence,
# compared exactly (case, accents composed or not), bound as values in every statement.
WIDE_NAMES = [
    "Factures clients 2026",
    "factures clients 2026",
    "commande-n\u00b07",
    "\u8acb\u6c42\u66f8",
    "e\u0301t\u00e9",  # e + combining acute, then a composed e-acute
    "\u00e9t\u00e9",
    "a'--; DROP TABLE numbering_ledger",
    "-leading-dash",
    "\U0001f9fe receipts",
    "\u00e9" * 100,
]


def test_names_of_any_text_are_sequences_of_their_own(numbers: Allocator, engine: Engine) -> None:
    for name in WIDE_NAMES:
        numbers.create_sequence(name)
    yearly = "Rechnungen " + "\u00fc" * 78  # 89 characters, the most for a periodic one
    numbers.create_sequence(yearly, period="year")
    with engine.begin() as conn:  # the one-step path (no key) and the general one
        for name in WIDE_NAMES:
            assert allocate(conn, name) == 1
            assert allocate(conn, name, key=f"{name}:k") == 2

    def take(thread: int) -> None:
        # Several sequences in one transaction, in different orders: they are locked in
        # one order (the names' code points) by every engine, so no deadlock.
        names = WIDE_NAMES[thread % 3 :: 2] if thread % 2 else WIDE_NAMES[::-1]
        for i in range(5):
            numbers.assign_many({name: [Request(f"{name}:{thread}:{i}")] for name in names})

    at_once(6, take)
    for i in range(3):
        assert numbers.next_value(yearly, key=f"y{i}", date="2026-03-01") == i + 1
    for name in WIDE_NAMES:
        by_key = check_gapless(engine, name)
        expected = 2 + sum(
            5 for t in range(6) if name in (WIDE_NAMES[t % 3 :: 2] if t % 2 else WIDE_NAMES)
        )
        assert len(by_key) == expected, name
    check_gapless(engine, f"{yearly}/2026", keys=["y0", "y1", "y2"])

    with engine.begin() as conn:  # delete() sets a long name aside within the limit
        archived = archive_sequence(conn, "\u00e9" * 100)
    assert archived is not None
    assert len(archived) <= 100
    check_gapless(engine, archived)
    assert numbers.create_sequence("\u00e9" * 100).last_value is None
