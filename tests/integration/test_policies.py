"""Numbering policies on PostgreSQL and SQLite: formats, periods, freeze, void, import,
and the append-only ledger. Every test ends with the gapless check of what it touched."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa
from conftest import FAST_RETRY
from integration.stack import Stack
from ledger_check import check_gapless
from sqlalchemy.engine import Engine

from numbering import Allocator
from numbering.config.celery import CONTROL_QUEUE
from numbering.errors import (
    InvalidPolicyError,
    InvalidRequestError,
    KeyReusedError,
    SequenceFrozenError,
    VoidError,
)
from numbering.policies import document_date, period_key, render
from numbering.routing import FREEZE_TASK_NAME, VOID_TASK_NAME
from numbering.tasks.app import create_app


@pytest.fixture
def numbers(engine: Engine) -> Allocator:
    return Allocator(engine)


def test_formats_render_as_documented(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("inv", format="INV-{year}-{number:06d}")
    numbers.create_sequence("all", format="{yy}{month}{day}/{number:,}/{{x}}", initial_value=999)
    first = numbers.next_block("inv", key="a", date="2026-03-07")
    assert (first.value, first.formatted, first.period) == (1, "INV-2026-000001", None)
    assert numbers.next_block("inv", key="b", date=date(2027, 1, 2)).formatted == "INV-2027-000002"
    assert numbers.next_block("all", key="c", date="2026-03-07").formatted == "260307/999/{x}"
    assert numbers.next_block("all", key="d", date="2026-03-07").formatted == "260307/1,000/{x}"
    # A resend returns the same formatted number when it carries the same date or none;
    # one dated otherwise asked for something else, and is refused.
    again = numbers.next_block("inv", key="a", date="2026-03-07")
    assert (again.resent, again.formatted) == (True, "INV-2026-000001")
    assert numbers.next_block("inv", key="a").formatted == "INV-2026-000001"
    with pytest.raises(KeyReusedError, match=r"would not get \(INV-2030-000001\)"):
        numbers.next_block("inv", key="a", date="2030-01-01")
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT request_key, formatted FROM numbering_ledger ORDER BY request_key")
        ).all()
    assert [tuple(row) for row in stored] == [
        ("a", "INV-2026-000001"),
        ("b", "INV-2027-000002"),
        ("c", "260307/999/{x}"),
        ("d", "260307/1,000/{x}"),
    ]
    check_gapless(engine, "inv", keys=["a", "b"])


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("INV-{year}", "must contain {number}"),
        ("{number.__class__}", "unknown field {number.__class__}"),
        ("{number[0]}", "unknown field"),
        ("{number!r}", "no conversions"),
        ("{year:>10}{number}", "only {number} takes a format spec"),
        ("{number:q}", "Unknown format code"),
        ("{number", "expected '}'"),
        ("{secret}{number}", "unknown field {secret}"),
        ("", "non-empty"),
        ("x" * 201 + "{number}", "at most 200"),
        ("{number:0300d}", "longer than 255"),
        ("A\n{number}", "control characters"),
    ],
)
def test_bad_formats_are_refused_at_creation(numbers: Allocator, fmt: str, message: str) -> None:
    with pytest.raises(InvalidPolicyError, match=message.replace("{", r"\{").replace("[", r"\[")):
        numbers.create_sequence("bad", format=fmt)
    assert [s.name for s in numbers.sequences()] == []


def test_bad_periods_time_zones_and_dates(numbers: Allocator) -> None:
    with pytest.raises(InvalidPolicyError, match="unknown period 'week'"):
        numbers.create_sequence("p", period="week")
    with pytest.raises(InvalidPolicyError, match="unknown time zone 'Mars/Olympus'"):
        numbers.create_sequence("p", timezone="Mars/Olympus")
    numbers.create_sequence("p", period="month")
    for bad in ("2026-02-30", "26-01-01", "2026/01/01", "yesterday", "2026-01-01T00:00"):
        with pytest.raises(InvalidPolicyError, match="invalid document date"):
            numbers.next_value("p", date=bad)
    with pytest.raises(InvalidPolicyError, match="invalid month '2026-13'"):
        numbers.freeze("p", "2026-13")
    numbers.create_sequence("flat")
    with pytest.raises(InvalidPolicyError, match="has no periods"):
        numbers.freeze("flat", "2026")
    assert numbers.sequence("p").last_value is None  # nothing was assigned


def test_the_year_turns_at_midnight_in_the_configured_time_zone() -> None:
    # 2026-12-31 11:30 UTC is already 2027-01-01 00:30 in Auckland (UTC+13).
    moment = datetime(2026, 12, 31, 11, 30, tzinfo=UTC)
    assert document_date(None, "Pacific/Auckland", now=moment) == date(2027, 1, 1)
    assert document_date(None, None, now=moment) == date(2026, 12, 31)
    assert document_date(None, "America/Los_Angeles", now=moment) == date(2026, 12, 31)
    just_before = datetime(2026, 12, 31, 10, 59, 59, tzinfo=UTC)  # 23:59:59 in Auckland
    assert document_date(None, "Pacific/Auckland", now=just_before) == date(2026, 12, 31)
    assert period_key("year", date(2027, 1, 1)) == "2027"
    assert period_key("month", date(2027, 1, 1)) == "2027-01"
    assert period_key("day", date(2027, 1, 1)) == "2027-01-01"
    assert render("{period}/{number}", 5, date(2027, 1, 1), "2027-01") == "2027-01/5"


def test_periods_back_dating_and_rollover(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("inv", format="INV-{year}-{number:04d}", period="year")
    got = [
        numbers.next_block("inv", key=f"k{i}", date=day)
        for i, day in enumerate(
            ["2026-12-31", "2026-12-31", "2027-01-01", "2026-06-30", "2027-02-01"]
        )
    ]
    assert [(b.period, b.value, b.formatted) for b in got] == [
        ("2026", 1, "INV-2026-0001"),
        ("2026", 2, "INV-2026-0002"),
        ("2027", 1, "INV-2027-0001"),
        ("2026", 3, "INV-2026-0003"),  # back-dated: lands in its own year
        ("2027", 2, "INV-2027-0002"),
    ]
    assert numbers.preview("inv", "2026-01-15") == "INV-2026-0004"
    assert numbers.preview("inv", "2031-01-01") == "INV-2031-0001"  # reserves nothing
    assert numbers.sequence("inv", "2031").last_value is None
    check_gapless(engine, "inv/2026", keys=["k0", "k1", "k3"])
    check_gapless(engine, "inv/2027", keys=["k2", "k4"])
    assert {r.sequence: r.ok for r in numbers.audit("inv")} == {
        "inv": True,
        "inv/2026": True,
        "inv/2027": True,
    }


def test_concurrent_first_requests_for_a_new_period(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("inv", period="month")
    got: list[int] = []
    errors: list[BaseException] = []

    def take(t: int) -> None:
        mine = Allocator(engine, retry=FAST_RETRY)
        try:
            for i in range(10):
                got.append(mine.next_value("inv", key=f"t{t}:{i}", date="2030-01-15"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(got) == list(range(1, 61))
    with engine.connect() as conn:
        counters = conn.execute(
            sa.text("SELECT name FROM numbering_sequence WHERE period_key IS NOT NULL")
        ).scalars()
        assert list(counters) == ["inv/2030-01"]
    check_gapless(engine, "inv/2030-01", keys=[f"t{t}:{i}" for t in range(6) for i in range(10)])


def test_frozen_sequences_and_periods_refuse_and_lose_nothing(
    numbers: Allocator, engine: Engine
) -> None:
    numbers.create_sequence("flat")
    numbers.create_sequence("inv", period="year")
    assert numbers.next_value("flat", key="f1") == 1
    assert numbers.next_value("inv", key="i1", date="2025-12-31") == 1
    numbers.freeze("flat")
    numbers.freeze("inv", "2025")  # year-end close
    numbers.freeze("inv", "2027")  # a period can be closed before it opens
    with pytest.raises(SequenceFrozenError, match="'flat' is frozen"):
        numbers.next_value("flat", key="f2")
    with pytest.raises(SequenceFrozenError, match="'inv/2025' is frozen"):
        numbers.next_value("inv", key="i2", date="2025-06-01")
    with pytest.raises(SequenceFrozenError, match="'inv/2027' is frozen"):
        numbers.next_value("inv", key="i3", date="2027-06-01")
    assert numbers.next_value("flat", key="f1") == 1  # a resend still gets its number
    assert numbers.next_value("inv", key="i4", date="2026-01-01") == 1  # 2026 is open
    assert numbers.sequence("flat").frozen
    assert numbers.sequence("inv", "2025").frozen
    numbers.unfreeze("flat")
    numbers.unfreeze("inv", "2025")
    assert numbers.next_value("flat", key="f2") == 2
    assert numbers.next_value("inv", key="i2", date="2025-06-01") == 2
    check_gapless(engine, "flat", keys=["f1", "f2"])
    check_gapless(engine, "inv/2025", keys=["i1", "i2"])
    check_gapless(engine, "inv/2027", keys=[])


def test_void_keeps_the_number_in_the_ledger_and_never_reissues_it(
    numbers: Allocator, engine: Engine
) -> None:
    numbers.create_sequence("inv", format="F{number}")
    for i in range(3):
        numbers.next_value("inv", key=f"k{i}")
    numbers.next_values("inv", 3, key="block")  # 4..6
    done = numbers.void("inv", value=2, reason="customer cancelled")
    assert (done.key, done.value, done.reason) == ("k1", 2, "customer cancelled")
    numbers.void("inv", key="block", reason="printed twice")
    with pytest.raises(VoidError, match="already voided: customer cancelled"):
        numbers.void("inv", key="k1", reason="again")
    with pytest.raises(VoidError, match=r"part of the block 4..6 assigned to key 'block'"):
        numbers.void("inv", value=5, reason="x")
    with pytest.raises(VoidError, match="has no assignment with value 99"):
        numbers.void("inv", value=99, reason="x")
    with pytest.raises(VoidError, match="give a reason"):
        numbers.void("inv", value=1, reason=" ")
    with pytest.raises(VoidError, match="by its key or by its value"):
        numbers.void("inv", value=1, key="k0", reason="x")
    assert numbers.next_value("inv", key="k9") == 7  # never reissued
    assert numbers.next_value("inv", key="k1") == 2  # the key keeps its (void) number
    [report] = numbers.audit("inv")
    assert (report.ok, report.voided, report.values) == (True, 2, 7)
    exported = {row["request_key"]: row for row in numbers.export("inv")}
    assert exported["k1"]["status"] == "voided"
    assert exported["k1"]["void_reason"] == "customer cancelled"
    assert exported["k1"]["voided_at"] is not None
    assert exported["block"]["status"] == "voided"
    assert exported["k0"]["status"] == "assigned"
    check_gapless(engine, "inv", keys=["k0", "k1", "k2", "block", "k9"])


def test_the_ledger_is_append_only_in_the_database(numbers: Allocator, engine: Engine) -> None:
    numbers.create_sequence("inv")
    numbers.next_value("inv", key="k")
    for statement in (
        "DELETE FROM numbering_ledger",
        "UPDATE numbering_ledger SET value = 5",
        "UPDATE numbering_ledger SET request_key = 'other'",
        "UPDATE numbering_ledger SET status = 'voided'",  # a void needs a reason and time
    ):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text(statement))
    numbers.void("inv", key="k", reason="ok")
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("UPDATE numbering_ledger SET status = 'assigned'"))  # no un-void
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE numbering_ledger"))
    check_gapless(engine, "inv", keys=["k"])


def test_import_starts_after_the_highest_existing_number(
    numbers: Allocator, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE legacy (id integer PRIMARY KEY, number bigint)"))
        conn.execute(sa.text("INSERT INTO legacy VALUES (1, 7), (2, 41), (3, NULL), (4, 12)"))
        conn.execute(sa.text("CREATE TABLE other (id integer PRIMARY KEY, label text)"))
    info = numbers.create_sequence(
        "inv", start_after=("legacy", "number"), allowed_tables=["legacy", "other"]
    )
    assert info.initial_value == 42
    assert numbers.next_value("inv", key="new") == 42
    with pytest.raises(InvalidRequestError, match="not in NUMBERING_BATCH_TABLES"):
        numbers.create_sequence("x", start_after=("legacy", "number"), allowed_tables=[])
    with pytest.raises(InvalidRequestError, match="has no column 'nope'"):
        numbers.create_sequence("x", start_after=("legacy", "nope"), allowed_tables=["legacy"])
    with pytest.raises(InvalidRequestError, match="not an integer column"):
        numbers.create_sequence("x", start_after=("other", "label"), allowed_tables=["other"])
    with pytest.raises(InvalidRequestError, match="does not exist"):
        numbers.create_sequence("x", start_after=("ghost", "n"), allowed_tables=["ghost"])
    empty = numbers.create_sequence(
        "fresh", start_after=("other", "id"), allowed_tables=["other"], initial_value=5
    )
    assert empty.initial_value == 5  # nothing to start after
    check_gapless(engine, "inv", keys=["new"])


def test_policies_through_the_queue(stack: Stack) -> None:
    """Dates travel with the request, formatted numbers and periods come back, and a
    frozen period refuses through the worker as it does in process."""
    numbers = Allocator(stack.settings.database_url)
    numbers.create_sequence("inv", format="INV-{period}-{number:03d}", period="month")
    stack.worker("--sequence", "inv")
    client = stack.client()
    got = [
        client.next_block("inv", key=f"k{i}", date=day)
        for i, day in enumerate(["2026-01-31", "2026-02-01", "2026-01-15"])
    ]
    assert [(b.value, b.formatted, b.period) for b in got] == [
        (1, "INV-2026-01-001", "2026-01"),
        (1, "INV-2026-02-001", "2026-02"),
        (2, "INV-2026-01-002", "2026-01"),
    ]
    again = client.next_block("inv", key="k0")  # a resend: same answer, whatever the date
    assert (again.resent, again.formatted) == (True, "INV-2026-01-001")
    numbers.freeze("inv", "2026-01")
    with pytest.raises(SequenceFrozenError, match="'inv/2026-01' is frozen"):
        client.next_value("inv", key="late", date="2026-01-20")
    with pytest.raises(InvalidPolicyError, match="invalid document date"):
        client.next_value("inv", key="bad", date="2026-02-30")
    check_gapless(numbers.engine, "inv/2026-01", keys=["k0", "k2"])
    check_gapless(numbers.engine, "inv/2026-02", keys=["k1"])


def test_void_and_freeze_as_celery_tasks(stack: Stack) -> None:
    """Admin tasks on the control queue, for Celery apps that manage sequences."""
    numbers = Allocator(stack.settings.database_url)
    numbers.create_sequence("inv")
    numbers.next_value("inv", key="k1")
    stack.worker("--sequence", "inv")
    app = create_app(stack.settings)

    def call(task: str, **kwargs: object) -> dict[str, object]:
        result = app.send_task(task, kwargs=kwargs, queue=CONTROL_QUEUE)
        answer: dict[str, object] = result.get(timeout=60)
        return answer

    assert call(FREEZE_TASK_NAME, sequence="inv") == {"sequence": "inv", "frozen": True}
    with pytest.raises(SequenceFrozenError):
        stack.client().next_value("inv", key="k2")
    refused = call(FREEZE_TASK_NAME, sequence="inv", frozen="false")
    assert "frozen must be true or false" in str(refused["error"])
    assert call(FREEZE_TASK_NAME, sequence="inv", frozen=False)["frozen"] is False
    voided = call(VOID_TASK_NAME, sequence="inv", key="k1", reason="cancelled")
    assert (voided["value"], voided["reason"]) == (1, "cancelled")
    again = call(VOID_TASK_NAME, sequence="inv", key="k1", reason="cancelled")
    assert "already voided" in str(again["error"])
    assert stack.client().next_value("inv", key="k2") == 2
    check_gapless(numbers.engine, "inv", keys=["k1", "k2"])
