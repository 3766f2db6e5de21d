"""Named points where a fault-injection test can make a worker die on the spot.

Production never arms them: a point does nothing unless the ``NUMBERING_FAILPOINTS``
environment variable names it, as ``point=action`` pairs separated by commas::

    NUMBERING_FAILPOINTS="after_commit=kill-once:/tmp/marker"

Actions:

``kill``
    SIGKILL this process every time the point is reached.
``kill-once:PATH``
    SIGKILL it the first time only (the file at PATH records that it happened).
``kill-on-key:KEY``
    SIGKILL it whenever the batch in hand holds request key KEY (a poison message).
``stop-once:PATH``
    SIGSTOP it the first time (it freezes until someone sends SIGCONT).

The worker's points, in the order a batch passes them: ``before_assign`` (transaction
open, nothing locked), ``before_commit`` (values assigned, not committed; on
PostgreSQL the ledger writes are still held back to go with COMMIT),
``after_commit`` (committed, nobody answered), ``after_reply`` (answered, not
acknowledged). And ``batches_in_flight``: two batches in flight, neither answered (the
older one's transaction running or committed, the newer one's just started).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path

from numbering.errors import ConfigurationError

__all__ = ["ENV_VAR", "POINTS", "failpoint"]

ENV_VAR = "NUMBERING_FAILPOINTS"
POINTS = ("before_assign", "before_commit", "after_commit", "after_reply", "batches_in_flight")


def _parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, action = item.partition("=")
        if not sep or point not in POINTS:
            raise ConfigurationError(
                f"{ENV_VAR}: {item!r} is not point=action with a point among {', '.join(POINTS)}"
            )
        if not (
            action == "kill" or action.startswith(("kill-once:", "kill-on-key:", "stop-once:"))
        ):
            raise ConfigurationError(f"{ENV_VAR}: unknown action {action!r}")
        armed[point] = action
    return armed


_ARMED = _parse(os.environ.get(ENV_VAR, ""))


def failpoint(point: str, keys: Iterable[str] = ()) -> None:
    """Die here if a test armed ``point``; otherwise do nothing (the usual case)."""
    action = _ARMED.get(point)
    if action is None:
        return
    if action.startswith(("kill-once:", "stop-once:")):
        marker = Path(action.partition(":")[2])
        if marker.exists():
            return
        marker.write_text(point)
        if action.startswith("stop-once:"):
            _signal_here(signal.SIGSTOP)
            return
    elif action.startswith("kill-on-key:") and action.removeprefix("kill-on-key:") not in keys:
        return
    _signal_here(signal.SIGKILL)


def _signal_here(signum: int) -> None:
    # Aimed at this thread: a signal sent to the process goes to whichever thread the
    # kernel picks (usually the main one), and this thread would run on for a moment,
    # long enough to send a COMMIT that the failpoint meant to come after the fault.
    signal.pthread_kill(threading.get_ident(), signum)
