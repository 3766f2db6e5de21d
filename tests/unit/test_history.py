"""The history checker itself: each violation it exists for is caught."""

from __future__ import annotations

import pytest
from history import FAIL, INFO, OK, Op, check_history, run_keys

from numbering.errors import InvalidRequestError, RequestTimeout


def op(key: str, type_: str, invoked: float, completed: float, value: int | None = None) -> Op:
    return Op("s", "p", key, type_, invoked, completed, value)


def test_a_clean_history_with_an_unknown_outcome_resolved_later() -> None:
    history = [
        op("a", INFO, 0, 10),  # timed out, but its number was assigned meanwhile
        op("b", OK, 1, 2, 2),
        op("c", FAIL, 3, 4),
        op("a", OK, 11, 12, 1),  # the resend gets the number a already had
        op("d", OK, 13, 14, 3),
    ]
    summary = check_history(history, "s", {"a": 1, "b": 2, "d": 3})
    assert (summary.ops, summary.ok, summary.failed, summary.unknown) == (5, 3, 1, 1)
    assert summary.unresolved == []


@pytest.mark.parametrize(
    ("history", "ledger", "message"),
    [
        ([op("a", OK, 0, 1, 1), op("b", OK, 2, 3, 1)], {"a": 1, "b": 1}, "given to 'a' and 'b'"),
        ([op("a", OK, 0, 1, 1), op("a", OK, 2, 3, 2)], {"a": 1}, "got different values"),
        ([op("a", OK, 0, 1, 1)], {"a": 2}, "was told 1, the ledger says 2"),
        ([op("a", OK, 0, 1, 1)], {}, "the ledger says None"),
        ([op("a", FAIL, 0, 1)], {"a": 1}, "was refused"),
        ([op("a", OK, 0, 1, 1)], {"a": 1, "ghost": 2}, "keys nobody sent: ['ghost']"),
        ([op("a", OK, 0, 1, 2), op("b", OK, 2, 3, 1)], {"a": 2, "b": 1}, "got the lower 1"),
        (  # the order check spans first send to answer: a's first try started before b
            [op("b", INFO, 0, 1), op("a", OK, 2, 3, 2), op("b", OK, 4, 5, 1)],
            {"a": 2, "b": 1},
            None,
        ),
    ],
)
def test_violations_are_caught(history: list[Op], ledger: dict[str, int], message: str) -> None:
    if message is None:
        check_history(history, "s", ledger)
        return
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_history(history, "s", ledger)


def test_other_sequences_ops_are_ignored() -> None:
    other = Op("t", "p", "x", OK, 0, 1, 1)
    assert check_history([other, op("a", OK, 2, 3, 1)], "s", {"a": 1}).ops == 1


def test_run_keys_records_outcomes_and_resends_unknown_keys() -> None:
    calls: list[str] = []
    numbers = {"k0": 1, "k1": 2}

    def attempt(key: str) -> int:
        calls.append(key)
        if key == "bad":
            raise InvalidRequestError("no")
        if calls.count(key) == 1 and key == "k1":
            raise RequestTimeout(key, "s", 1)
        return numbers[key]

    history = run_keys("s", "p", ["k0", "k1", "bad"], attempt)
    assert [(o.key, o.type, o.value) for o in history] == [
        ("k0", OK, 1),
        ("k1", INFO, None),
        ("bad", FAIL, None),
        ("k1", OK, 2),
    ]
    assert calls == ["k0", "k1", "bad", "k1"]
