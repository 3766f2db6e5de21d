"""Noticing a database failover, and checking before numbering on after one.

PostgreSQL starts a new *timeline* when a standby is promoted. The worker reads the
timeline on every new database connection (one query per connection; the pool keeps
them); the first one is recorded, and a connection that finds another one means the
primary changed. That connection is refused (:class:`FailoverDetected`, the batch stays
unacknowledged), the failover is logged, and before the next batch the counters of the
sequences this worker serves are checked against their ledgers: a promoted server whose
counter disagrees with its ledger was restored or edited, not failed over to, and the
worker numbers nothing on it until someone looks (the check is retried each turn).

What the check cannot see: a failover to an *asynchronous* standby that was behind rolls
the counter and the ledger back together, so both agree and answered numbers come again.
That is why the start-up check refuses asynchronous standbys (docs/ha.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event

from numbering.backends import backend_for
from numbering.errors import DatabaseError

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
        self._lock = threading.Lock()
        self._unchecked = False
        event.listen(engine, "connect", self._connected)

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
        problems = self.check()
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
