"""Noticing a database failover, and checking before numbering on after one.

PostgreSQL starts a new *timeline* when a standby is promoted. The worker reads the
timeline on every new database connection (one query per connection; the pool keeps
them); the first one is recorded, and a connection that finds another one means the
primary changed. That connection is refused (:class:`FailoverDetected`, the batch stays
unacknowledged), the failover is logged, and before the next batch the counters of the
sequences this worker serves are checked against their ledgers: a promoted server whose
counter disagrees with its ledger was restored or edited, not failed over to, and the
worker numbers nothing on it until someone looks (the check is retried each turn).

What the ledger check cannot see: a failover to an *asynchronous* standby that was behind
rolls the counter and the ledger back together, so both agree and answered numbers would
come again. So the watch also remembers every counter as it was at start-up and the
highest value this worker answered from each; a new primary whose counter is below
either was behind, and the worker numbers nothing from it. (Numbers another process
answered after this worker started are beyond its sight: the start-up check refuses
asynchronous standbys for that reason, docs/ha.md.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Engine, event, select

from numbering.backends import backend_for
from numbering.errors import DatabaseError
from numbering.plan import Assignment, Outcome
from numbering.policies import period_name
from numbering.schema import sequences

__all__ = ["FailoverDetected", "FailoverWatch"]

log = logging.getLogger("numbering.worker")


class FailoverDetected(DatabaseError):
    """The database is another server than before (a promoted standby)."""


class FailoverWatch:
    """Watches ``engine``'s new connections; ``check`` lists what is wrong with the
    served sequences (:func:`numbering.tasks.preflight.check_ledgers`)."""

    def __init__(self, engine: Engine, check: Callable[[], list[str]]) -> None:
        self.backend = backend_for(engine)
        self.check = check
        #: Called (from whichever thread connected) when a failover is noticed.
        self.on_failover: list[Callable[[], None]] = []
        #: The timeline of the server numbered on (None: not known yet, or no such thing).
        self.timeline: int | None = None
        self.engine = engine
        self._lock = threading.Lock()
        self._unchecked = False
        # Per counter (a sequence, or one period of it): the highest (cycle, value) known
        # to be handed out: the counter at start-up, then what this worker answered.
        self._high: dict[str, tuple[int, int]] = {}
        event.listen(engine, "connect", self._connected)

    def remember(self) -> None:
        """Record every counter as it is now (at start-up)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(sequences.c.name, sequences.c.cycle, sequences.c.last_value)
            ).all()
        for name, cycle, last in rows:
            if last is not None:
                self._high[name] = max(self._high.get(name, (-1, -1)), (cycle, last))

    def answered(self, outcomes: Iterable[Outcome]) -> None:
        """Record what a committed batch answered (before its replies go out)."""
        if self.timeline is None:  # no failovers to watch for (SQLite)
            return
        high = self._high
        for outcome in outcomes:
            if isinstance(outcome, Assignment):
                name = outcome.sequence
                if outcome.period is not None:
                    name = period_name(name, outcome.period)
                mark = (outcome.cycle, outcome.value + outcome.count - 1)
                if mark > high.get(name, (-1, -1)):
                    high[name] = mark

    def _behind(self) -> list[str]:
        """Counters of the new primary below what was handed out before the failover."""
        wanted = dict(self._high)
        if not wanted:
            return []
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(sequences.c.name, sequences.c.cycle, sequences.c.last_value).where(
                    sequences.c.name.in_(sorted(wanted))
                )
            ).all()
        now = {name: (cycle, -1 if last is None else last) for name, cycle, last in rows}
        problems = []
        for name, (cycle, value) in sorted(wanted.items()):
            found = now.get(name, (-1, -1))
            if found < (cycle, value):
                problems.append(
                    f"counter {name!r} is at {found[1]} (cycle {found[0]}) on the new primary, "
                    f"but {value} (cycle {cycle}) was handed out before the failover: the "
                    "standby was behind (asynchronous replication?); numbering on would hand "
                    "those numbers out again: an operator must repair it (docs/ha.md)"
                )
        return problems

    def _connected(self, dbapi_connection: Any, record: Any) -> None:
        seen = self.backend.timeline(dbapi_connection)
        if seen is None:
            return
        with self._lock:
            before, self.timeline = self.timeline, seen
            if before is None or before == seen:
                return
            self._unchecked = True
        for call in self.on_failover:
            call()
        log.warning(
            "database failover: the primary is on timeline %d now, it was on %d; "
            "checking counters against ledgers before numbering on",
            seen,
            before,
        )
        raise FailoverDetected(
            f"the database failed over (timeline {before} -> {seen}); checking before numbering on"
        )

    def confirm(self) -> None:
        """Before a batch: after a failover, the counter-vs-ledger check (raises while it
        finds a problem, so that nothing is numbered)."""
        if not self._unchecked:
            return
        problems = self._behind() + self.check()
        if problems:
            raise FailoverDetected(
                "after the database failover, numbering waits: " + "; ".join(problems)
            )
        with self._lock:
            self._unchecked = False
        log.warning(
            "after the failover to timeline %s: every served counter agrees with its "
            "ledger; numbering on",
            self.timeline,
        )
