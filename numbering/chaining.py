"""Writing each counter's hash chain (:mod:`numbering.chain`) with its ledger.

Every path that writes the ledger chains what it writes, in the transaction that writes
it and under the lock of the counter it writes to (so two writers never fork a chain):

- an assignment (the worker's batches, :func:`numbering.allocate`, the batch job's
  chunks, a takeover's block) becomes an ``assign`` record: :meth:`ChainWriter.chain_row`
  sets the row's ``link`` and ``fingerprint``;
- a void appends a ``void`` record, a sequence set aside a ``rename`` record;
- a counter's first assignment starts its chain with a ``start`` record. A counter that
  gave numbers before chains existed (a database upgraded to revision 0004) stays
  unchained until ``numbering chain backfill`` starts its chain and chains its rows.

The counter row keeps the chain's last link and fingerprint (``chain_link``,
``chain_head``), so a writer never reads the ledger to extend it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, insert, select, update

from numbering.chain import VERSION, canonical, fingerprint, format_time, record

__all__ = [
    "ChainWriter",
    "append_records",
    "assign_record",
    "assign_text",
    "chain_parts",
    "locked_chain",
    "open_chain",
    "stored_reference",
]

#: A ledger row's status once voided (numbering.schema.STATUS_VOIDED).
_VOIDED = "voided"


def stored_reference(reference: Any) -> Any:
    """``reference`` as the database will hand it back (JSON: tuples become lists, keys
    strings), which is what its fingerprint must cover."""
    if reference is None or isinstance(reference, (str, int, bool)):
        return reference
    return json.loads(json.dumps(reference))


def assign_record(row: Any, link: int, *, voided_later: bool = False) -> dict[str, Any]:
    """The ``assign`` record of ledger ``row`` at ``link``. ``voided_later``: a void
    record later in the chain changed the row, which was assigned when chained."""
    voided = not voided_later and row["status"] == _VOIDED
    return record(
        "assign",
        link,
        cycle=row["cycle"],
        value=row["value"],
        count=row["count"],
        request_key=row["request_key"],
        reference=stored_reference(row["reference"]),
        formatted=row["formatted"],
        at=row["assigned_at"],
        status=_VOIDED if voided else "assigned",
        void_reason=row["void_reason"] if voided else None,
        voided_at=row["voided_at"] if voided else None,
    )


def _time(moment: datetime | None) -> str:
    """:func:`numbering.chain.format_time` as JSON, quicker for the common case."""
    if moment is None:
        return "null"
    if moment.tzinfo is timezone.utc:
        return f'"{moment.isoformat(timespec="microseconds")[:-6]}Z"'
    return f'"{format_time(moment)}"'


def assign_text(row: Any, link: int, *, voided_later: bool = False) -> str:
    """The canonical text of :func:`assign_record` (``canonical(assign_record(...))``,
    which a unit test holds it to), written straight out: the worker chains every row
    it writes, and the generic encoder cost about 10 us a row."""
    voided = not voided_later and row["status"] == _VOIDED
    reference = row["reference"]
    encoded = "null" if reference is None else canonical(stored_reference(reference))
    status, reason, voided_at = '"assigned"', "null", "null"
    if voided:
        status = '"voided"'
        reason, voided_at = canonical(row["void_reason"]), _time(row["voided_at"])
    return (
        f'{{"at":{_time(row["assigned_at"])},"count":{int(row["count"])},'
        f'"cycle":{int(row["cycle"])},"formatted":{canonical(row["formatted"])},'
        f'"kind":"assign","link":{int(link)},"reference":{encoded},'
        f'"request_key":{canonical(row["request_key"])},"status":{status},'
        f'"value":{int(row["value"])},"void_reason":{reason},"voided_at":{voided_at}}}'
    )


@dataclass
class ChainWriter:
    """One counter's chain as a transaction extends it."""

    counter_id: int
    link: int
    head: str
    #: The records for ``numbering_chain`` this transaction appends (start, void, rename).
    records: list[dict[str, Any]] = field(default_factory=list)

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append a record that is not a ledger row; returns it."""
        self.link += 1
        found = record(kind, self.link, **fields)
        self.head = fingerprint(self.head, found)
        self.records.append(
            {
                "sequence_id": self.counter_id,
                "link": self.link,
                "kind": kind,
                "record": canonical(found),
                "fingerprint": self.head,
            }
        )
        return found

    def chain_row(self, row: dict[str, Any]) -> None:
        """Give ledger ``row`` (about to be inserted, or written before chains) its place
        in the chain and its fingerprint."""
        self.link += 1
        row["link"] = self.link
        text = f"{self.head}\n{assign_text(row, self.link)}"
        row["fingerprint"] = self.head = hashlib.sha256(text.encode()).hexdigest()

    def start(
        self, counter: Any, now: datetime, earlier: int = 0, initial_value: int | None = None
    ) -> None:
        """Start the chain of ``counter`` (its locked row) with its ``start`` record;
        ``earlier`` assignments written before chains follow it (the back-fill)."""
        self.append(
            "start",
            chain=VERSION,
            counter=counter.name,
            at=now,
            initial_value=counter.initial_value if initial_value is None else initial_value,
            earlier=earlier,
            cycle=counter.cycle,
            last_value=counter.last_value,
        )


def open_chain(
    counter: Any, now: datetime, *, initial_value: int | None = None
) -> ChainWriter | None:
    """The chain of ``counter`` (its locked row) to extend: started here if it has not
    started (link 0: the counter's first number since chains, from ``initial_value``
    when its bounds change in the same transaction); None for a counter whose numbers
    predate chains and which the back-fill has not reached (link NULL: its rows stay
    unchained until then)."""
    link = counter.chain_link
    if link is None:
        return None
    writer = ChainWriter(counter.id, int(link), str(counter.chain_head))
    if not link:
        writer.start(counter, now, initial_value=initial_value)
    return writer


def append_records(connection: Connection, chain: ChainWriter) -> None:
    """Write what ``chain`` appended that is not a ledger row (its records for
    ``numbering_chain``) and its new head on the counter, in ``connection``'s
    transaction (which holds the counter's lock)."""
    from numbering.schema import chain_records, sequences

    if chain.records:
        connection.execute(insert(chain_records), chain.records)
        chain.records = []
    connection.execute(
        update(sequences)
        .where(sequences.c.id == chain.counter_id)
        .values(chain_link=chain.link, chain_head=chain.head)
    )


def locked_chain(connection: Connection, counter_id: int) -> ChainWriter | None:
    """The chain of counter ``counter_id``, its row locked for the rest of the
    transaction; None while it has not started."""
    from numbering.schema import sequences

    counter = connection.execute(
        select(sequences.c.chain_link, sequences.c.chain_head)
        .where(sequences.c.id == counter_id)
        .with_for_update()
    ).one()
    if not counter.chain_link:
        return None
    return ChainWriter(counter_id, int(counter.chain_link), str(counter.chain_head))


def chain_parts(request: Any, now: datetime) -> dict[str, str]:
    """The canonical text of a fresh row's assign record (see :func:`assign_record`),
    in the pieces that go around its cycle, link and value, which only the statement
    that takes the block knows (``Backend.take_plain``): the statement's text is
    ``chain_before_cycle + cycle + chain_before_link + link + chain_before_value +
    value + chain_end``."""
    marks = {"cycle": -1, "link": -2, "value": -3}
    text = canonical(
        record(
            "assign",
            marks["link"],
            cycle=marks["cycle"],
            value=marks["value"],
            count=request.count,
            request_key=request.key,
            reference=stored_reference(request.reference),
            formatted=None,
            at=now,
            status="assigned",
            void_reason=None,
            voided_at=None,
        )
    )
    # Keys sort as at, count, cycle, formatted, kind, link, reference, request_key,
    # status, value, void_reason, voided_at. Nothing before "link" can hold a mark (no
    # object, and a string's quotes are escaped); the reference can, so "value" is found
    # from the end, where only two nulls follow it.
    head, rest = text.split('"cycle":-1', 1)
    middle, rest = rest.split('"link":-2', 1)
    before_value, end = rest.rsplit('"value":-3', 1)
    return {
        "chain_before_cycle": head + '"cycle":',
        "chain_before_link": middle + '"link":',
        "chain_before_value": before_value + '"value":',
        "chain_end": end,
    }
