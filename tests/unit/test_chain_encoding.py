"""The chain's encoding (numbering.chain): the canonical text the docs spell out, and the
worker's quick writer of assign records held to it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from numbering.chain import GENESIS, ChainProblem, canonical, fingerprint, record
from numbering.chaining import assign_record, assign_text, chain_parts
from numbering.plan import Request


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (1.5e-7, "1.5e-7"),
        (1e-6, "0.000001"),
        (123.456, "123.456"),
        (1.0, "1"),
        (-0.0, "0"),
        (1e21, "1000000000000000000000"),
        (2.0**60, "1152921504606847000"),  # its shortest form, as a database keeps it
        (1.234e25, "12340000000000000000000000"),
        (1.5e20, "150000000000000000000"),
        (5e-324, "5e-324"),
        (-2.5, "-2.5"),
        (10**30, "1000000000000000000000000000000"),  # an integer, exactly
        (True, "true"),
        (None, "null"),
        ('a"b\\c\n\x01é€', '"a\\"b\\\\c\\n\\u0001é€"'),
        ({"b": [1, None], "a": {"é": 1, "z": 2}}, '{"a":{"z":2,"é":1},"b":[1,null]}'),
    ],
)
def test_canonical_text(value: Any, text: str) -> None:
    assert canonical(value) == text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_what_json_cannot_hold_is_refused(value: Any) -> None:
    with pytest.raises(ChainProblem):
        canonical(value)


def test_the_documented_start_record() -> None:
    """docs/tamper-evidence.md's example, byte for byte."""
    start = record(
        "start", 1, chain="numbering-chain/1", counter="invoices",
        at=datetime(2026, 12, 8, 12, tzinfo=UTC), initial_value=1, earlier=0, cycle=0,
        last_value=None,
    )  # fmt: skip
    text = (
        '{"at":"2026-12-08T12:00:00.000000Z","chain":"numbering-chain/1","counter":'
        '"invoices","cycle":0,"earlier":0,"initial_value":1,"kind":"start",'
        '"last_value":null,"link":1}'
    )
    assert canonical(start) == text
    expected = hashlib.sha256(f"{GENESIS}\n{text}".encode()).hexdigest()
    assert fingerprint(GENESIS, start) == expected


ROWS = [
    {"reference": None, "formatted": None, "status": "assigned"},
    {"reference": {"total": 1.5, "lines": [1, (2, 3)], 7: "seven"}, "formatted": "INV-7"},
    {"reference": 'a "quoted"\nnote', "status": "voided", "void_reason": "typo\t!"},
    {"reference": 3, "status": "voided", "voided_at": datetime(2026, 1, 2, tzinfo=UTC)},
    {"assigned_at": datetime(2026, 3, 4, 5, 6, 7, 8, tzinfo=timezone(timedelta(hours=-5)))},
    {"assigned_at": datetime(2026, 3, 4, 5, 6, 7)},  # no zone: UTC, as SQLite gives it
]


@pytest.mark.parametrize("changes", ROWS)
@pytest.mark.parametrize("voided_later", [False, True])
def test_the_quick_writer_writes_the_canonical_record(
    changes: dict[str, Any], voided_later: bool
) -> None:
    row = {
        "cycle": 2, "value": 41, "count": 3, "request_key": "inv:é", "reference": None,
        "formatted": None, "assigned_at": datetime(2026, 12, 8, 1, 2, 3, 456789, tzinfo=UTC),
        "status": "assigned", "void_reason": None, "voided_at": None,
    }  # fmt: skip
    row.update(changes)
    if row["status"] == "voided":
        row["void_reason"] = row["void_reason"] or "cancelled"
        row["voided_at"] = row["voided_at"] or datetime(2026, 12, 9, tzinfo=UTC)
    expected = canonical(assign_record(row, 9, voided_later=voided_later))
    assert assign_text(row, 9, voided_later=voided_later) == expected


def test_the_pieces_the_one_step_path_sends_make_the_record() -> None:
    """What the database puts between the pieces (cycle, link, value) gives the record's
    canonical text, even when the reference holds keys named like the marks."""
    now = datetime(2026, 12, 8, 1, 2, 3, 4, tzinfo=UTC)
    request = Request("inv:1", 2, {"value": -3, "cycle": -1, "link": -2})
    parts = chain_parts(request, now)
    text = (
        parts["chain_before_cycle"] + "4" + parts["chain_before_link"] + "17"
        + parts["chain_before_value"] + "99" + parts["chain_end"]
    )  # fmt: skip
    row = {
        "cycle": 4, "value": 99, "count": 2, "request_key": "inv:1",
        "reference": request.reference, "formatted": None, "assigned_at": now,
        "status": "assigned",
    }  # fmt: skip
    assert text == canonical(assign_record(row, 17))
