"""An operation history, recorded by clients and checked against the ledger afterwards.

In the manner of Jepsen's unique-ids checker: each attempt to get a number is recorded
as one operation whose outcome is

- ``ok``: the client got a value;
- ``fail``: the request was definitely refused (nothing can have been assigned);
- ``info``: the outcome is unknown (a timeout, a lost connection): a value may or may
  not have been assigned.

After the faults heal, a client resends every key whose outcome was unknown, under the
same key, so each key ends with an ``ok`` (or stays unknown if the run gave up).

:func:`check_history` then checks, against the committed ledger:

1. every ``ok`` value is unique across the whole history (per key: a key's later ``ok``
   must repeat its earlier value);
2. every ``ok`` value is the ledger's value for that key;
3. no key whose every operation ``fail``-ed has a number;
4. the ledger holds no key that was never sent;
5. real-time order: numbering is serial, so when key A's number was delivered before key
   B was first sent, A's number is lower than B's (across all clients; the interval of a
   key runs from its first send to its ``ok``, as its number may have been assigned by an
   earlier, unknown attempt).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from numbering.errors import InvalidRequestError, SequenceNotFoundError

OK, FAIL, INFO = "ok", "fail", "info"
# Errors after which nothing can have been assigned; anything else is an unknown outcome.
DEFINITE_FAILURES = (InvalidRequestError, SequenceNotFoundError)


@dataclass(frozen=True)
class Op:
    sequence: str
    process: str
    key: str
    type: str  # ok | fail | info
    invoked: float  # time.monotonic(): one clock for every process of the machine
    completed: float
    value: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record(sequence: str, process: str, key: str, attempt: Callable[[], int]) -> Op:
    """Run ``attempt`` once and record its outcome."""
    invoked = time.monotonic()
    try:
        value = attempt()
    except DEFINITE_FAILURES as exc:
        return Op(sequence, process, key, FAIL, invoked, time.monotonic(), error=repr(exc))
    except Exception as exc:
        return Op(sequence, process, key, INFO, invoked, time.monotonic(), error=repr(exc))
    return Op(sequence, process, key, OK, invoked, time.monotonic(), value=value)


def run_keys(
    sequence: str,
    process: str,
    keys: Iterable[str],
    attempt: Callable[[str], int],
    *,
    heal_rounds: int = 20,
) -> list[Op]:
    """One key at a time; then resend each unknown key until it is answered (bounded)."""

    def once(key: str) -> Op:
        return record(sequence, process, key, lambda: attempt(key))

    history = [once(key) for key in keys]
    for _ in range(heal_rounds):
        resolved = {op.key for op in history if op.type in (OK, FAIL)}
        unknown = [op.key for op in history if op.type == INFO and op.key not in resolved]
        if not unknown:
            break
        history += [once(key) for key in unknown]
    return history


@dataclass
class HistorySummary:
    ops: int
    ok: int
    failed: int
    unknown: int
    unresolved: list[str]


def check_history(
    history: Iterable[Op], sequence: str, ledger_values: dict[str, int]
) -> HistorySummary:
    """Check ``sequence``'s operations in ``history`` against its ledger (key -> first
    value). Raises AssertionError on the first violation."""
    history = [op for op in history if op.sequence == sequence]
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)

    owner: dict[int, str] = {}
    for key, ops in by_key.items():
        values = {op.value for op in ops if op.type == OK}
        assert len(values) <= 1, f"key {key!r} got different values: {sorted(values)}"  # type: ignore[type-var]
        for value in values:
            assert value is not None
            other = owner.setdefault(value, key)
            assert other == key, f"value {value} was given to {other!r} and {key!r}"
            assert ledger_values.get(key) == value, (
                f"key {key!r} was told {value}, the ledger says {ledger_values.get(key)}"
            )
        if all(op.type == FAIL for op in ops):
            assert key not in ledger_values, (
                f"key {key!r} was refused ({ops[-1].error}) yet holds {ledger_values[key]}"
            )
    never_sent = sorted(set(ledger_values) - set(by_key))
    assert not never_sent, f"the ledger numbers keys nobody sent: {never_sent[:10]}"

    _check_real_time_order(by_key)
    unresolved = sorted(
        key for key, ops in by_key.items() if not any(op.type in (OK, FAIL) for op in ops)
    )
    return HistorySummary(
        ops=len(history),
        ok=sum(op.type == OK for op in history),
        failed=sum(op.type == FAIL for op in history),
        unknown=sum(op.type == INFO for op in history),
        unresolved=unresolved,
    )


def _check_real_time_order(by_key: dict[str, list[Op]]) -> None:
    spans = []  # (first sent, answered, value, key) of every answered key
    for key, ops in by_key.items():
        answered = [op for op in ops if op.type == OK]
        if answered:
            first_sent = min(op.invoked for op in ops)
            spans.append((first_sent, answered[0].completed, answered[0].value, key))
    by_completion = sorted(spans, key=lambda span: span[1])
    completions = [span[1] for span in by_completion]
    # highest[i]: the highest value (and its key) among the first i+1 answered keys.
    highest: list[tuple[int, str]] = []
    for _, _, value, key in by_completion:
        assert value is not None
        highest.append(max(highest[-1], (value, key)) if highest else (value, key))
    for sent, _, value, key in spans:
        before = bisect.bisect_left(completions, sent)  # answered strictly before B was sent
        if before:
            top, top_key = highest[before - 1]
            assert value is not None
            assert top < value, (
                f"key {top_key!r} was answered {top} before key {key!r} was sent, "
                f"yet {key!r} got the lower {value}"
            )


def load(raw: Iterable[dict[str, Any]]) -> list[Op]:
    return [Op(**op) for op in raw]
