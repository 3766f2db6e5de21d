"""Reading the ledger back: the gapless audit and the export for auditors.

The audit re-derives every sequence from its ledger alone and compares the result with
the counter: each cycle must hold exactly ``initial_value .. end`` with every value in
exactly one block, non-final cycles must end just before ``reset_value``, and the last
block must end at the counter's ``last_value``. Rows are streamed in value order, so
memory stays flat however long the ledger is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.exc import DBAPIError

from numbering.chain import GENESIS, ChainProblem, fingerprint, format_time
from numbering.chaining import ChainWriter, append_records, assign_record, locked_chain
from numbering.database import translate_error
from numbering.errors import SequenceNotFoundError, VoidError
from numbering.schema import STATUS_VOIDED, as_utc, chain_records, ledger, sequences
from numbering.validation import check_sequence_name

__all__ = [
    "EXPORT_FIELDS",
    "AuditReport",
    "Backfilled",
    "Voided",
    "audit",
    "backfill_step",
    "chain_heads",
    "export",
    "export_chain",
    "unchained_counters",
    "void",
]

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
    "link",
    "fingerprint",
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
    #: What the check of the counter's hash chain found, in a line.
    chain: str = ""

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
    if report.chain:
        lines.append(f"  chain: {report.chain}")
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
    rows = connection.execute(
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
        .execution_options(yield_per=STREAM_CHUNK)
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
    _audit_chain(connection, seq, report)
    return report


# -- the hash chain ---------------------------------------------------------------------


@dataclass
class _Link:
    """One record of a counter's chain as the database holds it."""

    link: int
    record: dict[str, Any]  # as numbering.chain encodes it
    fingerprint: str | None  # as stored
    row: Any = None  # the ledger row, for an assign record
    problem: str | None = None  # a record that cannot even be read


def _chain_records(connection: Connection, seq: Any) -> list[Any]:
    return list(
        connection.execute(
            select(chain_records)
            .where(chain_records.c.sequence_id == seq.id)
            .order_by(chain_records.c.link)
        ).all()
    )


def _walk_chain(connection: Connection, seq: Any) -> Iterator[_Link]:
    """Counter ``seq``'s chain in link order: its ledger rows (as assign records, in the
    state they were chained in) merged with its other records."""
    others = _chain_records(connection, seq)
    voided_later: dict[str, dict[str, Any]] = {}
    parsed: list[_Link] = []
    for other in others:
        try:
            found = json.loads(other.record)
            if not isinstance(found, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            parsed.append(
                _Link(other.link, {"kind": other.kind}, other.fingerprint, None, str(exc))
            )
            continue
        parsed.append(_Link(other.link, found, other.fingerprint))
        if found.get("kind") == "void" and isinstance(found.get("request_key"), str):
            voided_later[found["request_key"]] = found
    rows = connection.execute(
        select(ledger)
        .where(ledger.c.sequence_id == seq.id, ledger.c.link.is_not(None))
        .order_by(ledger.c.link)
        .execution_options(yield_per=STREAM_CHUNK)
    )
    pending = iter(parsed)
    other = next(pending, None)
    for row in rows:
        data = row._mapping
        while other is not None and other.link < data["link"]:
            yield other
            other = next(pending, None)
        later = voided_later.get(data["request_key"])
        try:
            content = assign_record(data, data["link"], voided_later=later is not None)
        except ChainProblem as exc:
            yield _Link(data["link"], {"kind": "assign"}, data["fingerprint"], data, str(exc))
            continue
        yield _Link(data["link"], content, data["fingerprint"], data)
    while other is not None:
        yield other
        other = next(pending, None)


def _named(item: _Link) -> str:
    if item.row is not None:
        row = item.row
        return (
            f"link {item.link} (value {row['value']}, cycle {row['cycle']}, "
            f"key {row['request_key']!r})"
        )
    return f"link {item.link} ({item.record.get('kind')} record)"


def _audit_chain(connection: Connection, seq: Any, report: AuditReport) -> None:
    """Check counter ``seq``'s hash chain: every record's fingerprint follows from its
    content and the record before it, the links run 1, 2, 3, ... to the counter's head,
    and every ledger row is in the chain (or awaits the back-fill its start announced)."""
    unchained = connection.execute(
        select(func.count(), func.max(ledger.c.cycle)).where(
            ledger.c.sequence_id == seq.id, ledger.c.link.is_(None)
        )
    ).one()
    waiting = int(unchained[0])
    if not seq.chain_link:
        chained = connection.execute(
            select(func.count()).where(ledger.c.sequence_id == seq.id, ledger.c.link.is_not(None))
        ).scalar_one()
        if chained or _chain_records(connection, seq):
            report.problem(
                "the counter has no chain, yet records of one are in the database: its chain "
                "head was cleared"
            )
        elif waiting and seq.chain_link is None:
            report.chain = (
                f"not started: {waiting} assignment(s) predate chains "
                "(run `numbering chain backfill`)"
            )
        elif waiting:
            report.problem(f"chain: {waiting} assignment(s) are not in the chain: added by hand")
        return
    head, expected, count, start = GENESIS, 1, 0, None
    name = None
    voids: list[_Link] = []
    before = len(report.problems) + report.unlisted_problems
    for item in _walk_chain(connection, seq):
        count += 1
        where = _named(item)
        if item.problem is not None:
            report.problem(f"chain: {where} cannot be read: {item.problem}")
            head, expected = item.fingerprint or head, item.link + 1
            continue
        if item.link != expected:
            report.problem(
                f"chain: {where} comes after link {expected - 1}: "
                + ("records are missing" if item.link > expected else "a link is used twice")
            )
        try:
            computed = fingerprint(head, item.record)
        except ChainProblem as exc:
            computed = f"({exc})"
        if item.record.get("link") != item.link or computed != item.fingerprint:
            report.problem(
                f"chain: {where} does not match its fingerprint: it was changed, or a record "
                "before it was changed, inserted or removed"
            )
        kind = item.record.get("kind")
        if kind == "start":
            start = item.record
            name = item.record.get("counter")
        elif kind == "rename":
            name = item.record.get("counter")
        elif kind == "void" and item.row is None:
            voids.append(item)  # checked once the rows' stream is read
        head, expected = item.fingerprint or computed, item.link + 1
    for item in voids:
        _check_void(connection, seq, item, report)
    if start is None:
        report.problem("chain: it has no start record")
    elif name != seq.name:
        report.problem(f"chain: it names the counter {name!r}, not {seq.name!r}: renamed by hand")
    if (expected - 1, head) != (seq.chain_link, seq.chain_head):
        report.problem(
            f"chain: the counter's head is link {seq.chain_link}, the chain ends at link "
            f"{expected - 1} with another fingerprint: records were added or removed at its end"
        )
    earlier = start.get("earlier", 0) if start else 0
    if waiting and start is not None:
        # What awaits the back-fill was there when the chain started: no more rows than
        # the start record counted, none past where the counter stood then.
        stood = (start.get("cycle"), start.get("last_value"))
        past = 0
        if isinstance(stood[0], int) and isinstance(stood[1], int):
            past = connection.execute(
                select(func.count()).where(
                    ledger.c.sequence_id == seq.id,
                    ledger.c.link.is_(None),
                    (ledger.c.cycle > stood[0])
                    | ((ledger.c.cycle == stood[0]) & (ledger.c.value > stood[1])),
                )
            ).scalar_one()
        if waiting > earlier or past or stood[1] is None:
            report.problem(
                f"chain: {waiting} assignment(s) are not in the chain, and the chain's start "
                f"announced {earlier} earlier one(s) up to value {stood[1]}: added by hand"
            )
    broken = len(report.problems) + report.unlisted_problems > before
    report.chain = (
        f"{'BROKEN' if broken else 'ok'}, {count} record(s), head {seq.chain_head[:16]}..."
    )
    if waiting and earlier:
        report.chain += (
            f"; {waiting} of the {earlier} earlier assignment(s) await the back-fill "
            "(run `numbering chain backfill`)"
        )


def _check_void(connection: Connection, seq: Any, item: _Link, report: AuditReport) -> None:
    """A void record's row must be voided as the record says."""
    record = item.record
    row = connection.execute(
        select(ledger.c.status, ledger.c.void_reason, ledger.c.voided_at, ledger.c.value).where(
            ledger.c.sequence_id == seq.id, ledger.c.request_key == record.get("request_key")
        )
    ).one_or_none()
    at = None if row is None or row.voided_at is None else format_time(as_utc(row.voided_at))
    if row is None or (row.status, row.void_reason, at, row.value) != (
        STATUS_VOIDED,
        record.get("reason"),
        record.get("at"),
        record.get("value"),
    ):
        report.problem(
            f"chain: link {item.link} voids key {record.get('request_key')!r}, and its ledger "
            "row does not say so: changed after the void"
        )


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
        for seq in _counters(connection, name, period):
            yield from _export_one(connection, seq)
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def _export_one(connection: Connection, seq: Any) -> Iterator[dict[str, Any]]:
    rows = connection.execute(
        select(ledger)
        .where(ledger.c.sequence_id == seq.id)
        .order_by(ledger.c.cycle, ledger.c.value)
        .execution_options(yield_per=STREAM_CHUNK)
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
            "link": data["link"],
            "fingerprint": data["fingerprint"],
        }


def export_chain(
    connection: Connection, name: str, period: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the hash chain of sequence ``name`` (each period's, or ``period``'s), one
    record after another in link order, each with its ``fingerprint``: what
    ``numbering export --format chain`` writes and the standalone verifier reads."""
    try:
        for seq in _counters(connection, name, period):
            if not seq.chain_link:
                continue
            for item in _walk_chain(connection, seq):
                yield {**item.record, "link": item.link, "fingerprint": item.fingerprint}
    except DBAPIError as exc:
        raise translate_error(exc) from exc


def chain_heads(connection: Connection, name: str | None = None) -> list[dict[str, Any]]:
    """The head of every counter's chain (or sequence ``name``'s counters'): counter,
    last link, its fingerprint and the time read, to keep somewhere else."""
    now = format_time(datetime.now(UTC))
    try:
        return [
            {"counter": seq.name, "link": seq.chain_link, "fingerprint": seq.chain_head, "at": now}
            for seq in _sequence_rows(connection, name)
            if seq.chain_link
        ]
    except DBAPIError as exc:
        raise translate_error(exc) from exc


@dataclass
class Backfilled:
    """What one step of the back-fill did to one counter."""

    counter: str
    chained: int  # rows chained by this step
    left: int  # rows of the counter still unchained after it
    started: bool  # this step started the counter's chain


def unchained_counters(connection: Connection) -> list[str]:
    """The counters whose numbers predate chains: their chain has not started, or rows
    of theirs are still outside it."""
    unchained = select(ledger.c.sequence_id).where(ledger.c.link.is_(None)).scalar_subquery()
    query = (
        select(sequences.c.name)
        .where(sequences.c.chain_link.is_(None) | sequences.c.id.in_(unchained))
        .order_by(sequences.c.name)
    )
    return list(connection.execute(query).scalars())


def backfill_step(connection: Connection, counter: str, chunk: int) -> Backfilled:
    """Chain up to ``chunk`` rows of ``counter`` written before chains, oldest value
    first, in the caller's transaction and under the counter's lock; start its chain
    first (with a start record that says how many rows were there before it)."""
    from numbering.store import store_for

    try:
        seq = store_for(connection).lock_sequence(counter, nowait=False)
        now = datetime.now(UTC)
        started = not seq.chain_link
        if started:
            earlier = connection.execute(
                select(func.count()).where(ledger.c.sequence_id == seq.id)
            ).scalar_one()
            chain = ChainWriter(seq.id, 0, GENESIS)
            chain.start(seq, now, earlier=int(earlier))
        else:
            chain = ChainWriter(seq.id, int(seq.chain_link), str(seq.chain_head))
        rows = connection.execute(
            select(ledger)
            .where(ledger.c.sequence_id == seq.id, ledger.c.link.is_(None))
            .order_by(ledger.c.cycle, ledger.c.value)
            .limit(chunk)
        ).all()
        chained = []
        for found in rows:
            row = dict(found._mapping)
            chain.chain_row(row)
            chained.append(
                {"row_id": row["id"], "row_link": row["link"], "row_fp": row["fingerprint"]}
            )
        if chained:
            connection.execute(
                update(ledger)
                .where(ledger.c.id == bindparam("row_id"))
                .values(link=bindparam("row_link"), fingerprint=bindparam("row_fp")),
                chained,
            )
        append_records(connection, chain)
        left = connection.execute(
            select(func.count()).where(ledger.c.sequence_id == seq.id, ledger.c.link.is_(None))
        ).scalar_one()
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return Backfilled(counter, len(chained), int(left), started)


def _counters(connection: Connection, name: str, period: str | None) -> list[Any]:
    """Sequence ``name``'s counters (each period's), or only ``period``'s."""
    if period is None:
        return _sequence_rows(connection, name)
    from numbering.sequences import get_sequence

    counter = get_sequence(connection, name, period)  # checks the period
    query = select(sequences).where(sequences.c.name == counter.name)
    return list(connection.execute(query).all())  # none: the period is unused


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
        if row.link is not None:  # a row awaiting the back-fill is chained voided
            _chain_void(connection, row, reason, now)
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    return Voided(name, row.request_key, row.value, row.block_count, row.cycle, reason, now)


def _chain_void(connection: Connection, row: Any, reason: str, now: datetime) -> None:
    """Append the void of ``row`` to its counter's chain, under the counter's lock."""
    chain = locked_chain(connection, row.sequence_id)
    if chain is None:  # the row is chained, so its counter's chain has started
        raise AssertionError(f"ledger row {row.id} is chained, its counter is not")
    chain.append(
        "void", request_key=row.request_key, cycle=row.cycle, value=row.value, at=now, reason=reason
    )
    append_records(connection, chain)


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
        ledger.c.sequence_id,
        ledger.c.link,
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
