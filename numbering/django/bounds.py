"""A looping call's bounds against the sequence's stored ones.

django-sequences stores no bounds: every call applies its own ``initial_value`` and
``reset_value``. numbering stores them with the sequence (its audit needs them to know
which values each cycle must hold), so a looping call whose bounds differ from the
stored ones must not quietly follow the stored ones. Two cases are made to agree, under
the sequence's lock, in the caller's transaction:

- a sequence that never looped and has not reached ``reset_value`` yet (made by a call
  without bounds, or taken over from django-sequences, which cannot know them) starts
  looping at the call's bounds. A taken-over sequence started at django-sequences'
  ``last + 1``: the values ``initial_value .. last`` that django-sequences gave go into
  the ledger as one block under the key ``takeover:NAME:ID``, so that the audit finds
  each cycle whole;
- anything else is refused with :class:`~numbering.errors.InvalidRequestError` naming
  both definitions (django-sequences would follow the call; a sequence numbering would
  wrap at two places is not one numbering can audit).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from numbering.chaining import append_records, open_chain
from numbering.errors import InvalidRequestError
from numbering.schema import STATUS_ASSIGNED, ledger, sequences
from numbering.sequences import SequenceInfo, _find
from numbering.store import store_for

__all__ = ["agree"]


def agree(
    bind: Any,
    name: str,
    initial_value: int,
    reset_value: int,
    taken_over: Callable[[], bool],
    nowait: bool,
) -> None:
    """Make sequence ``name`` loop at ``initial_value .. reset_value - 1`` as the call asks,
    or raise; nothing to do when it already does or does not exist yet (the call creates
    it). ``taken_over()`` says whether django-sequences gave its first values (asked
    only when the bounds differ)."""
    info = _find(bind, name)
    if info is None or _same(info, initial_value, reset_value):
        return
    row = store_for(bind).lock_sequence(name, nowait)
    info = SequenceInfo._from_row(row)  # as it is now that it is locked
    if _same(info, initial_value, reset_value):
        return  # another caller made it agree meanwhile
    before = info.initial_value - 1  # the last value given before numbering's first
    last = info.last_value if info.last_value is not None else before
    if (
        info.reset_value is not None
        or info.cycle != 0
        or info.period is not None
        or last >= reset_value
        or info.initial_value < initial_value
        or (info.initial_value != initial_value and not taken_over())
    ):
        stored = (
            f"does not loop (initial_value={info.initial_value})"
            if info.reset_value is None
            else f"loops at initial_value={info.initial_value}, reset_value={info.reset_value}"
        )
        raise InvalidRequestError(
            f"sequence {name!r} {stored} (stored with it; last value {info.last_value}, "
            f"cycle {info.cycle}); this call asks for initial_value={initial_value}, "
            f"reset_value={reset_value}. numbering keeps one definition per sequence "
            "(docs/django.md, 'The bounds are stored with the sequence')"
        )
    now = datetime.now(timezone.utc)
    block: dict[str, Any] | None = None
    if before >= initial_value:  # django-sequences' values of this cycle, as one block
        block = {
            "sequence_id": row.id,
            "cycle": 0,
            "value": initial_value,
            "count": before - initial_value + 1,
            "request_key": f"takeover:{name}:{row.id}",
            "reference": {"taken_over_from": "django-sequences"},
            "status": STATUS_ASSIGNED,
            "assigned_at": now,
            "formatted": None,
        }
    chain = open_chain(row, now, initial_value=initial_value)
    if chain is not None:
        if row.chain_link:  # started before this call: the chain says the bounds changed
            chain.append("bounds", initial_value=initial_value, reset_value=reset_value, at=now)
        if block is not None:
            chain.chain_row(block)
        append_records(bind.connection() if isinstance(bind, Session) else bind, chain)
    if block is not None:
        bind.execute(insert(ledger).values(block))
    bind.execute(
        update(sequences)
        .where(sequences.c.id == row.id)
        .values(
            initial_value=initial_value,
            reset_value=reset_value,
            last_value=last if last >= initial_value else None,
            updated_at=now,
        )
    )


def _same(info: SequenceInfo, initial_value: int, reset_value: int) -> bool:
    return (info.initial_value, info.reset_value) == (initial_value, reset_value)
