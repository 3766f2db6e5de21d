"""The allocation plan over plain data: what each request gets from its locked counters,
with no database (numbering.plan)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import pytest

from numbering import chain
from numbering.chaining import assign_record
from numbering.errors import (
    InvalidCountError,
    InvalidPolicyError,
    KeyReusedError,
    SequenceExhaustedError,
    SequenceFrozenError,
)
from numbering.plan import (
    Assignment,
    CounterUpdate,
    Outcome,
    Planned,
    Prior,
    Request,
    assign_groups,
    sort_requests,
)

NOW = datetime(2026, 3, 7, 12, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Row:
    """A locked ``numbering_sequence`` row, as plain data."""

    id: int
    name: str
    initial_value: int = 1
    reset_value: int | None = None
    max_value: int | None = None
    last_value: int | None = None
    cycle: int = 0
    frozen: bool = False
    format: str | None = None
    period: str | None = None
    timezone: str | None = None
    chain_link: int | None = 0  # a counter created since chains: not started
    chain_head: str | None = chain.GENESIS


def plan(
    seq: Row,
    requests: list[Request],
    prior: dict[str, Prior] | None = None,
    taken: dict[str, str] | None = None,
    periods: dict[str, Row] | None = None,
) -> tuple[list[Outcome], list[dict[str, object]], list[CounterUpdate]]:
    done = sort_requests(seq.name, seq, requests, prior or {}, taken or {})
    counters = {}
    for key in done.periods:  # what the store would lock or create, in this order
        counters[key] = (periods or {}).get(key) or Row(100 + len(counters), f"{seq.name}/{key}")
    planned = assign_groups(seq.name, seq, requests, done, counters, NOW)
    return planned.outcomes, planned.rows, planned.updates


def planned(seq: Row, requests: list[Request]) -> Planned:
    """Step 2's whole result for a sequence without periods."""
    done = sort_requests(seq.name, seq, requests, {}, {})
    return assign_groups(seq.name, seq, requests, done, {}, NOW)


def blocks(outcomes: list[Outcome]) -> list[object]:
    return [
        (o.value, o.count, o.cycle, o.resent) if isinstance(o, Assignment) else type(o)
        for o in outcomes
    ]


def test_new_requests_get_consecutive_blocks_and_one_counter_update() -> None:
    seq = Row(1, "invoices", last_value=9)
    outcomes, rows, updates = plan(seq, [Request("a"), Request("b", 3), Request("c")])
    assert blocks(outcomes) == [(10, 1, 0, False), (11, 3, 0, False), (14, 1, 0, False)]
    assert [(r["sequence_id"], r["value"], r["count"], r["request_key"]) for r in rows] == [
        (1, 10, 1, "a"),
        (1, 11, 3, "b"),
        (1, 14, 1, "c"),
    ]
    assert [update[:3] for update in updates] == [(1, 14, 0)]


def test_a_resend_gets_its_block_and_writes_nothing() -> None:
    seq = Row(1, "invoices", last_value=5)
    prior = {"a": Prior(1, 0, 3, 1)}
    outcomes, rows, updates = plan(seq, [Request("a")], prior)
    assert blocks(outcomes) == [(3, 1, 0, True)]
    assert (rows, updates) == ([], [])


def test_a_resend_that_asks_for_something_else_is_refused() -> None:
    seq = Row(1, "fy", period="year", format="F{year}-{number}")
    prior = {"k": Prior(7, 0, 1, 2, 1, "F2027-1", "2027")}
    [other_count] = plan(seq, [Request("k", 1)], prior)[0]
    assert isinstance(other_count, KeyReusedError)
    assert "block of 2 value(s), not 1" in str(other_count)
    [other_year] = plan(seq, [Request("k", 2, date="2025-01-01")], prior)[0]
    assert isinstance(other_year, KeyReusedError)
    assert "in period 2027, not 2025" in str(other_year)
    [same] = plan(seq, [Request("k", 2, date="2027-05-05")], prior)[0]
    assert isinstance(same, Assignment)
    assert (same.value, same.resent, same.formatted) == (1, True, "F2027-1")
    [elsewhere] = plan(seq, [Request("k", 2)], {"k": Prior(99, 0, 1, 2)})[0]
    assert isinstance(elsewhere, KeyReusedError)
    assert "another sequence" in str(elsewhere)


def test_copies_of_one_key_in_a_batch_share_the_first_copy_s_block() -> None:
    seq = Row(1, "invoices")
    outcomes, rows, _ = plan(seq, [Request("a"), Request("b"), Request("a")])
    assert blocks(outcomes) == [(1, 1, 0, False), (2, 1, 0, False), (1, 1, 0, True)]
    assert len(rows) == 2
    mismatch, _, _ = plan(seq, [Request("a"), Request("a", 2)])
    assert isinstance(mismatch[1], KeyReusedError)


def test_a_key_taken_on_another_sequence_in_the_same_pass_fails_alone() -> None:
    outcomes, rows, _ = plan(
        Row(1, "invoices"), [Request("x"), Request("y")], taken={"x": "credit-notes"}
    )
    assert isinstance(outcomes[0], KeyReusedError)
    assert blocks(outcomes)[1] == (1, 1, 0, False)
    assert [r["request_key"] for r in rows] == ["y"]


def test_a_looping_sequence_wraps_and_refuses_a_block_that_straddles_the_wrap() -> None:
    seq = Row(1, "seconds", initial_value=0, reset_value=3, last_value=1)
    outcomes, _, updates = plan(seq, [Request("a"), Request("b"), Request("c", 2)])
    assert blocks(outcomes) == [(2, 1, 0, False), (0, 1, 1, False), (1, 2, 1, False)]
    assert [update[:3] for update in updates] == [(1, 2, 1)]
    [straddles] = plan(replace(seq, last_value=0), [Request("d", 3)])[0]
    assert isinstance(straddles, InvalidCountError)
    assert "does not fit in the 2 value(s) left" in str(straddles)


def test_exhaustion_fails_the_requests_that_do_not_fit_and_keeps_the_rest() -> None:
    top = 2**63 - 1
    seq = Row(1, "near", initial_value=top - 2, last_value=top - 2)
    outcomes, _, updates = plan(seq, [Request("a", 3), Request("b"), Request("c")])
    assert isinstance(outcomes[0], SequenceExhaustedError)
    assert blocks(outcomes)[1:] == [(top - 1, 1, 0, False), (top, 1, 0, False)]
    assert [update[:3] for update in updates] == [(1, top, 0)]
    [after] = plan(replace(seq, last_value=top), [Request("d")])[0]
    assert isinstance(after, SequenceExhaustedError)


def test_periods_draw_from_their_own_counters_in_key_order() -> None:
    seq = Row(1, "fy", period="year", format="INV-{year}-{number:03d}")
    periods = {
        "2025": Row(20, "fy/2025", last_value=4, chain_link=None),  # numbers predate chains
        "2026": Row(21, "fy/2026"),
    }
    requests = [
        Request("a", date="2026-02-01"),
        Request("b", date="2025-12-31"),
        Request("c", date="2026-02-02"),
    ]
    outcomes, rows, updates = plan(seq, requests, periods=periods)
    assert [(o.value, o.period, o.formatted) for o in outcomes if isinstance(o, Assignment)] == [
        (1, "2026", "INV-2026-001"),
        (5, "2025", "INV-2025-005"),
        (2, "2026", "INV-2026-002"),
    ]
    assert [r["sequence_id"] for r in rows] == [20, 21, 21]
    assert [update[:3] for update in updates] == [(20, 5, 0), (21, 2, 0)]
    # 2025's counter gave numbers before chains: its row stays unchained; 2026's first
    # numbers start its chain (link 1 is the start record).
    assert [r["link"] for r in rows] == [None, 2, 3]
    assert [r["fingerprint"] is None for r in rows] == [True, False, False]
    assert [update.chain_link for update in updates] == [None, 3]


def test_rows_are_chained_in_order_after_the_counter_s_head() -> None:
    """A counter's first number starts its chain; the next batch continues from the
    head the first left on the counter, and the verifier accepts the whole chain and
    names a changed record."""
    seq = Row(1, "invoices")
    first = planned(seq, [Request("a", reference={"total": 1.5}), Request("b", 2)])
    [start] = first.records
    assert (start["kind"], start["link"]) == ("start", 1)
    assert [r["link"] for r in first.rows] == [2, 3]
    [update] = first.updates
    assert update.chain_head == first.rows[-1]["fingerprint"]
    after = replace(seq, last_value=3, chain_link=update.chain_link, chain_head=update.chain_head)
    second = planned(after, [Request("c")])
    assert second.records == []
    assert [r["link"] for r in second.rows] == [4]
    exported = [{**json.loads(start["record"]), "fingerprint": start["fingerprint"]}]
    exported += [
        {**assign_record(row, row["link"]), "fingerprint": row["fingerprint"]}
        for row in first.rows + second.rows
    ]
    [report] = chain.verify(enumerate(exported, 1))
    assert report.ok, report.problems
    assert (report.links, report.assignments, report.head) == (4, 3, second.rows[-1]["fingerprint"])
    exported[1]["reference"] = {"total": 2.5}
    [report] = chain.verify(enumerate(exported, 1))
    assert [problem.split(":")[0] for problem in report.problems] == ["line 2"]


def test_a_counter_whose_numbers_predate_chains_stays_unchained() -> None:
    found = planned(Row(1, "old", last_value=7, chain_link=None, chain_head=None), [Request("a")])
    assert found.records == []
    assert found.rows[0]["link"] is None
    assert found.updates == [CounterUpdate(1, 8, 0, None, None)]


def test_frozen_sequences_and_periods_assign_nothing() -> None:
    [frozen] = plan(Row(1, "invoices", frozen=True), [Request("a")])[0]
    assert isinstance(frozen, SequenceFrozenError)
    seq = Row(1, "fy", period="year")
    periods = {"2025": Row(20, "fy/2025", frozen=True)}
    outcomes, rows, updates = plan(
        seq,
        [Request("a", date="2025-06-01"), Request("b", date="2026-06-01")],
        periods=periods,
    )
    assert isinstance(outcomes[0], SequenceFrozenError)
    assert "'fy/2025' is frozen" in str(outcomes[0])
    assert blocks(outcomes)[1] == (1, 1, 0, False)
    assert [r["sequence_id"] for r in rows] == [101]  # the 2026 counter, made for it
    assert len(updates) == 1
    # A resend still gets its number from a frozen sequence.
    [resent] = plan(Row(1, "invoices", frozen=True), [Request("a")], {"a": Prior(1, 0, 1, 1)})[0]
    assert isinstance(resent, Assignment)


@pytest.mark.parametrize("count", [0, -1])
def test_requests_are_validated_before_any_plan(count: int) -> None:
    with pytest.raises(InvalidCountError):
        Request("a", count)
    with pytest.raises(InvalidPolicyError):
        Request("a", date="2026-02-30")
