"""The gapless invariant, checked from the raw tables with plain SQL.

Deliberately independent of numbering's own audit code: a bug there must not be able to
hide a bug in allocation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine


def check_gapless(
    engine: Engine, name: str, *, keys: Iterable[str] | None = None
) -> dict[str, list[int]]:
    """Assert that ``name``'s committed ledger is gapless; return each key's values.

    Gapless: the ledger holds exactly initial..last of every cycle (full cycles up to
    reset_value - 1 before the current one), each value once, each tied to exactly one
    request key, and the counter agrees. With ``keys``, the ledger's keys are exactly those.
    """
    with engine.connect() as conn:
        seq = conn.execute(
            sa.text(
                "SELECT id, initial_value, reset_value, last_value, cycle "
                "FROM numbering_sequence WHERE name = :name"
            ),
            {"name": name},
        ).one()
        count = conn.dialect.identifier_preparer.quote_identifier("count")  # "count", `count`
        rows = conn.execute(
            sa.text(
                f"SELECT cycle, value, {count}, request_key FROM numbering_ledger "
                "WHERE sequence_id = :id"
            ),
            {"id": seq.id},
        ).all()

    key_counts = Counter(row.request_key for row in rows)
    repeated = [key for key, n in key_counts.items() if n > 1]
    assert not repeated, f"keys with more than one assignment: {repeated[:10]}"

    seen: Counter[tuple[int, int]] = Counter()
    by_key: dict[str, list[int]] = {}
    for row in rows:
        values = list(range(row.value, row.value + row[2]))
        by_key[row.request_key] = values
        seen.update((row.cycle, v) for v in values)
    duplicates = [cv for cv, n in seen.items() if n > 1]
    assert not duplicates, f"values given more than once (cycle, value): {duplicates[:10]}"

    expected: set[tuple[int, int]] = set()
    if seq.last_value is not None:
        for cycle in range(seq.cycle):
            expected.update((cycle, v) for v in range(seq.initial_value, seq.reset_value))
        expected.update((seq.cycle, v) for v in range(seq.initial_value, seq.last_value + 1))
    missing = sorted(expected - set(seen))
    extra = sorted(set(seen) - expected)
    assert not missing, f"gaps (cycle, value): {missing[:10]} ({len(missing)} in all)"
    assert not extra, f"values beyond the counter (cycle, value): {extra[:10]}"

    if keys is not None:
        wanted = set(keys)
        assert set(by_key) == wanted, (
            f"ledger keys differ: missing {sorted(wanted - set(by_key))[:10]}, "
            f"unexpected {sorted(set(by_key) - wanted)[:10]}"
        )
    return by_key
