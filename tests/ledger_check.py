"""The gapless invariant, checked from the raw tables with plain SQL.

Deliberately independent of numbering's own audit code: a bug there must not be able to
hide a bug in allocation. The hash chain is checked with numbering.chain, the standalone
verifier auditors run, fed from the raw rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from numbering import chain


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

    check_chain(engine, name)
    if keys is not None:
        wanted = set(keys)
        assert set(by_key) == wanted, (
            f"ledger keys differ: missing {sorted(wanted - set(by_key))[:10]}, "
            f"unexpected {sorted(set(by_key) - wanted)[:10]}"
        )
    return by_key


def _time(value: object) -> str | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return chain.format_time(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))


def check_chain(engine: Engine, name: str) -> int:
    """Assert that counter ``name``'s hash chain holds every ledger row and verifies (with
    numbering.chain's verifier, the auditor's, fed from the raw tables); return its
    length (0: a counter that never gave a number, whose chain has not started)."""
    with engine.connect() as conn:
        seq = conn.execute(
            sa.text(
                "SELECT id, last_value, chain_link, chain_head FROM numbering_sequence "
                "WHERE name = :name"
            ),
            {"name": name},
        ).one()
        count = conn.dialect.identifier_preparer.quote_identifier("count")
        rows = conn.execute(
            sa.text(
                f"SELECT link, fingerprint, cycle, value, {count}, request_key, reference, "
                "formatted, assigned_at, status, void_reason, voided_at FROM numbering_ledger "
                "WHERE sequence_id = :id"
            ),
            {"id": seq.id},
        ).all()
        others = conn.execute(
            sa.text(
                "SELECT link, record, fingerprint FROM numbering_chain WHERE sequence_id = :id"
            ),
            {"id": seq.id},
        ).all()
        parsed_json = conn.dialect.name == "postgresql"  # jsonb comes back parsed
    assert seq.chain_link is not None, f"counter {name} has no chain: it predates chains"
    if seq.chain_link == 0:
        assert rows == [], f"counter {name}'s chain has not started, yet it has rows"
        assert others == [], f"counter {name}'s chain has not started, yet it has records"
        return 0
    unchained = [row.request_key for row in rows if row.link is None]
    assert not unchained, f"rows outside the chain: {unchained[:10]}"
    entries: dict[int, dict[str, object]] = {}
    voided_later = set()
    for other in others:
        entry = json.loads(other.record)
        entries[other.link] = {**entry, "fingerprint": other.fingerprint}
        if entry["kind"] == "void":
            voided_later.add(entry["request_key"])
    for row in rows:
        reference = row.reference
        if isinstance(reference, str) and not parsed_json:
            reference = json.loads(reference)
        later = row.request_key in voided_later
        entries[row.link] = {
            **chain.record(
                "assign",
                row.link,
                cycle=row.cycle,
                value=row.value,
                count=row[4],
                request_key=row.request_key,
                reference=reference,
                formatted=row.formatted,
                at=_time(row.assigned_at),
                status="assigned" if later else row.status,
                void_reason=None if later else row.void_reason,
                voided_at=None if later else _time(row.voided_at),
            ),
            "fingerprint": row.fingerprint,
        }
    assert sorted(entries) == list(range(1, len(entries) + 1)), "links are not 1, 2, 3, ..."
    [report] = chain.verify((link, entries[link]) for link in sorted(entries))
    assert report.ok, f"chain of {name}: {report.problems[:5]}"
    assert (report.links, report.head) == (seq.chain_link, seq.chain_head), (
        f"counter {name}'s head is not its chain's last record"
    )
    return report.links
