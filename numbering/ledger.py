"""Reading the ledger back: the gapless audit and the export for auditors.

The audit re-derives every sequence from its ledger alone and compares the result with
the counter: each cycle must hold exactly ``initial_value .. end`` with every value in
exactly one block, non-final cycles must end just before ``reset_value``, and the last
block must end at the counter's ``last_value``. Rows are streamed in value order, so
memory stays flat however long the ledger is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import DBAPIError

from numbering.database import translate_error
from numbering.errors import SequenceNotFoundError, VoidError
from numbering.schema import STATUS_VOIDED, as_utc, ledger, sequences
from numbering.validation import check_sequence_name

__all__ = ["EXPORT_FIELDS", "AuditReport", "Voided", "audit", "export", "void"]

# The fields of each exported assignment, in order.
EXPORT_FIELDS = (
    "sequence",
    "cycle",
    "value",
    "last",
    "count",
    "request_key",
    "reference",
    "status",
    "void_reason",
    "assigned_at",
    "voided_at",
    "formatted",
)

# A report lists at most this many problems per sequence, then counts the rest.
MAX_LISTED_PROBLEMS = 50
# Rows fetched from the server at a time while streaming the ledger.
STREAM_CHUNK = 10_000


@dataclass
class AuditReport:
    """What the audit found for one sequence."""

    sequence: str
    last_value: int | None
    cycle: int
    assignments: int = 0
    values: int = 0
    voided: int = 0
    problems: list[str] = field(default_factory=list)
    unlisted_problems: int = 0
    #: Voided assignments, for the auditor: "value (cycle c, key k): reason" (at most
    #: MAX_LISTED_PROBLEMS; ``voided`` counts them all).
    voids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the ledger is gapless, duplicate-free and agrees with the counter."""
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(text)
        else:
            self.unlisted_problems += 1


def _sequence_rows(connection: Connection, name: str | None) -> list[Any]:
    """Every sequence, or ``name`` and its period counters (``name/2026``, ...)."""
    query = select(sequences).order_by(sequences.c.name)
    if name is not None:
        parent = select(sequences.c.id).where(sequences.c.name == check_sequence_name(name))
        query = query.where(
            (sequences.c.name == name) | sequences.c.parent_id.in_(parent.scalar_subquery())
        )
    rows = list(connection.execute(query).all())
    if name is not None and not rows:
        raise SequenceNotFoundError(name)
    return rows


def describe(report: AuditReport) -> list[str]:
    """``report`` as the lines ``numbering audit`` prints for it."""
    state = "ok" if report.ok else "PROBLEM"
    last = "-" if report.last_value is None else report.last_value
    lines = [
        f"{report.sequence}: {state}: last value {last}, cycle {report.cycle}, "
        f"{report.values} value(s) in {report.assignments} assignment(s), "
        f"{report.voided} voided"
    ]
    lines += [f"  - {problem}" for problem in report.problems]
    if report.unlisted_problems:
        lines.append(f"  - ... and {report.unlisted_problems} more")
    lines += [f"  voided {void}" for void in report.voids]
    if report.voided > len(report.voids):
        lines.append(f"  voided ... and {report.voided - len(report.voids)} more")
    return lines


def audit(connection: Connection, name: str | None = None) -> list[AuditReport]:
    """Audit sequence ``name``, or every sequence; one report per sequence."""
    try:
        return [_audit_one(connection, seq) for seq in _sequence_rows(connection, name)]
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def _audit_one(connection: Connection, seq: Any) -> AuditReport:
    report = AuditReport(seq.name, seq.last_value, seq.cycle)
    rows = connection.execution_options(yield_per=STREAM_CHUNK).execute(
        select(
            ledger.c.cycle,
            ledger.c.value,
            ledger.c.count.label("block_count"),  # Row.count is tuple.count
            ledger.c.status,
            ledger.c.request_key,
            ledger.c.void_reason,
        )
        .where(ledger.c.sequence_id == seq.id)
        .order_by(ledger.c.cycle, ledger.c.value)
    )
    cycle = 0
    expected = seq.initial_value  # the next value the ledger should hold
    for row in rows:
        report.assignments += 1
        report.values += row.block_count
        if row.status == STATUS_VOIDED:
            report.voided += 1
            if len(report.voids) < MAX_LISTED_PROBLEMS:
                last = row.value + row.block_count - 1
                values = f"{row.value}" if last == row.value else f"{row.value}..{last}"
                report.voids.append(
                    f"{values} (cycle {row.cycle}, key {row.request_key!r}): {row.void_reason}"
                )
        if row.cycle != cycle:
            _check_cycle_end(report, seq, cycle, expected)
            if row.cycle != cycle + 1:
                report.problem(f"cycles {cycle + 1}..{row.cycle - 1} are missing")
            cycle, expected = row.cycle, seq.initial_value
        if row.value > expected:
            report.problem(f"gap: cycle {cycle} is missing values {expected}..{row.value - 1}")
        elif row.value < expected:
            overlap_end = min(expected, row.value + row.block_count) - 1
            report.problem(
                f"duplicate: cycle {cycle} gives values {row.value}..{overlap_end} more than once"
            )
        expected = max(expected, row.value + row.block_count)

    ledger_last = expected - 1 if report.assignments else None
    if (ledger_last, cycle) != (seq.last_value, seq.cycle):
        report.problem(
            f"counter disagrees with ledger: counter says last value {seq.last_value} in cycle "
            f"{seq.cycle}, ledger ends at {ledger_last} in cycle {cycle}"
        )
    return report


def _check_cycle_end(report: AuditReport, seq: Any, cycle: int, expected: int) -> None:
    if seq.reset_value is None:
        report.problem(f"sequence does not loop but its ledger has cycle {cycle + 1}")
    elif expected < seq.reset_value:
        report.problem(
            f"gap: cycle {cycle} is missing values {expected}..{seq.reset_value - 1} "
            "before it loops"
        )


def export(
    connection: Connection, name: str, period: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield sequence ``name``'s ledger in value order, one dict per assignment.

    The keys are :data:`EXPORT_FIELDS`; times are ISO 8601 in UTC. A periodic sequence
    is exported period by period (``sequence`` names the period's counter), or only
    ``period`` (``2025``, ``2025-03``, ...) when given. An unknown sequence or period
    raises before the first row.
    """
    try:
        if period is None:
            found = _sequence_rows(connection, name)  # a periodic one: each period's counter
        else:
            from numbering.sequences import get_sequence

            counter = get_sequence(connection, name, period)  # checks the period
            query = select(sequences).where(sequences.c.name == counter.name)
            found = list(connection.execute(query).all())  # none: the period is unused
        for seq in found:
            yield from _export_one(connection, seq)
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def _export_one(connection: Connection, seq: Any) -> Iterator[dict[str, Any]]:
    rows = connection.execution_options(yield_per=STREAM_CHUNK).execute(
        select(ledger)
        .where(ledger.c.sequence_id == seq.id)
        .order_by(ledger.c.cycle, ledger.c.value)
    )
    for row in rows:
        data = row._mapping  # by name: Row.count is tuple.count
        yield {
            "sequence": seq.name,
            "cycle": data["cycle"],
            "value": data["value"],
            "last": data["value"] + data["count"] - 1,
            "count": data["count"],
            "request_key": data["request_key"],
            "reference": data["reference"],
            "status": data["status"],
            "void_reason": data["void_reason"],
            "assigned_at": _iso(data["assigned_at"]),
            "voided_at": _iso(data["voided_at"]),
            "formatted": data["formatted"],
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat()


@dataclass(frozen=True)
class Voided:
    """A voided assignment: it stays in the ledger and its values are never given again."""

    sequence: str
    key: str
    value: int
    count: int
    cycle: int
    reason: str
    voided_at: datetime


MAX_VOID_REASON = 1000


def void(
    connection: Connection,
    sequence: str,
    *,
    reason: str,
    key: str | None = None,
    value: int | None = None,
    period: str | None = None,
    cycle: int | None = None,
) -> Voided:
    """Void an assignment of ``sequence``, named by its request ``key`` or by its
    ``value`` (in ``period`` for a periodic sequence; in the current ``cycle`` unless
    given). The row stays in the ledger with the reason and time; the number is never
    given again, and the audit lists it. A value inside a block of several is voided by
    voiding the block's key."""
    from numbering.sequences import get_sequence
    from numbering.store import store_for

    name = check_sequence_name(sequence)
    if not isinstance(reason, str) or not reason.strip():
        raise VoidError("give a reason for voiding (auditors will read it)")
    if len(reason) > MAX_VOID_REASON:
        raise VoidError(f"a void reason is at most {MAX_VOID_REASON} characters")
    if (key is None) == (value is None):
        raise VoidError("name the number to void by its key or by its value (one of them)")
    try:
        seq = store_for(connection).lock_sequence(name, nowait=False)
        if period is not None:
            counter = get_sequence(connection, name, period)
            query = select(sequences.c.id, sequences.c.cycle).where(
                sequences.c.name == counter.name
            )
            found = connection.execute(query).one_or_none()
            ids = [] if found is None else [found.id]
            current_cycle = 0 if found is None else found.cycle
        else:
            children = select(sequences.c.id).where(sequences.c.parent_id == seq.id)
            ids = [seq.id, *connection.execute(children).scalars()]
            current_cycle = seq.cycle
        row = _find_assignment(connection, ids, key, value, cycle, current_cycle, seq.period)
        if row is None:
            what = f"key {key!r}" if key is not None else f"value {value}"
            raise VoidError(f"sequence {name!r} has no assignment with {what}")
        if value is not None and row.block_count > 1:
            raise VoidError(
                f"value {value} is part of the block {row.value}.."
                f"{row.value + row.block_count - 1} assigned to key {row.request_key!r}; "
                "void the whole block by its key"
            )
        if row.status == STATUS_VOIDED:
            raise VoidError(
                f"{row.request_key!r} ({row.value}) is already voided: {row.void_reason}"
            )
        now = datetime.now(UTC)
        connection.execute(
            update(ledger)
            .where(ledger.c.id == row.id)
            .values(status=STATUS_VOIDED, void_reason=reason, voided_at=now)
        )
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return Voided(name, row.request_key, row.value, row.block_count, row.cycle, reason, now)


def _find_assignment(
    connection: Connection,
    ids: list[int],
    key: str | None,
    value: int | None,
    cycle: int | None,
    current_cycle: int,
    period: str | None,
) -> Any:
    columns = (
        ledger.c.id,
        ledger.c.request_key,
        ledger.c.value,
        ledger.c.count.label("block_count"),
        ledger.c.cycle,
        ledger.c.status,
        ledger.c.void_reason,
    )
    if not ids:
        return None
    if key is not None:
        query = select(*columns).where(ledger.c.request_key == key)
        return connection.execute(query.where(ledger.c.sequence_id.in_(ids))).one_or_none()
    if period is not None and len(ids) > 1:
        raise VoidError("this sequence has periods: say which one (--period)")
    query = (
        select(*columns)
        .where(
            ledger.c.sequence_id == ids[0],
            ledger.c.cycle == (current_cycle if cycle is None else cycle),
            ledger.c.value <= value,
        )
        .order_by(ledger.c.value.desc())
        .limit(1)
    )
    row = connection.execute(query).one_or_none()
    if row is None or value is None or value >= row.value + row.block_count:
        return None
    return row
