"""The one retry policy: which failures are retried, how often, and how long to wait.

Only :class:`~numbering.errors.RetryableError` is retried: serialization failures (40001),
deadlocks (40P01), a locked sequence or SQLite database, a request key inserted by a
concurrent transaction, and a lost connection. Each retry runs the *whole* transaction
again with the *same* request keys, so a retry after a COMMIT whose reply was lost finds
the key already assigned and returns that number instead of taking a second one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from numbering.errors import ConnectionLost, RetriesExhaustedError, RetryableError
from numbering.validation import check_seconds

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT_INITIAL",
    "DEFAULT_WAIT_MAX",
    "RetryPolicy",
    "RetryStats",
]

log = logging.getLogger("numbering.retry")

T = TypeVar("T")

# At most this many runs of one transaction.
DEFAULT_ATTEMPTS = 20
# At most this many seconds from the first attempt until giving up.
DEFAULT_TIMEOUT = 30.0
# The first wait's upper bound; each later bound doubles (full jitter) ...
DEFAULT_WAIT_INITIAL = 0.005
# ... up to this many seconds.
DEFAULT_WAIT_MAX = 0.5


@dataclass
class RetryStats:
    """Thread-safe counts of what the policy retried, by error class name."""

    _counts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, error: BaseException) -> None:
        with self._lock:
            self._counts[type(error).__name__] += 1
            self._counts["total"] += 1

    @property
    def total(self) -> int:
        """How many retries happened in all."""
        with self._lock:
            return self._counts["total"]

    def as_dict(self) -> dict[str, int]:
        """A snapshot of the counts, ``{"total": n, "SerializationConflict": m, ...}``."""
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds and waits for retrying a transaction.

    Waits are random between 0 and ``wait_initial * 2**attempt`` capped at ``wait_max``
    ("full jitter"), so that callers that collided once do not collide again in lock-step.
    ``RetryPolicy(wait_initial=0, wait_max=0)`` retries without waiting (handy in tests).
    """

    attempts: int = DEFAULT_ATTEMPTS
    timeout: float = DEFAULT_TIMEOUT
    wait_initial: float = DEFAULT_WAIT_INITIAL
    wait_max: float = DEFAULT_WAIT_MAX

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError("attempts must be an integer")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        check_seconds(self.timeout, "retry timeout")
        check_seconds(self.wait_initial, "retry wait_initial", allow_zero=True)
        check_seconds(self.wait_max, "retry wait_max", allow_zero=True)

    def call(
        self,
        fn: Callable[[], T],
        *,
        stats: RetryStats | None = None,
        describe: str = "transaction",
    ) -> T:
        """Call ``fn`` until it returns, retrying :class:`RetryableError` within the bounds.

        Any other error propagates at once. When the bounds run out,
        :class:`RetriesExhaustedError` is raised with the last error as ``__cause__``.
        """
        started = time.monotonic()
        lost_connection = False

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if error is None:  # pragma: no cover - only failures are retried
                return
            if isinstance(error, ConnectionLost):
                nonlocal lost_connection
                lost_connection = True
            if stats is not None:
                stats.record(error)
            log.info(
                "retrying %s after attempt %d failed: %s (waiting %.3fs)",
                describe,
                state.attempt_number,
                error,
                state.upcoming_sleep,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_after_delay(self.timeout),
            wait=tenacity.wait_random_exponential(multiplier=self.wait_initial, max=self.wait_max),
            retry=tenacity.retry_if_exception_type(RetryableError),
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            return retrying(fn)
        except tenacity.RetryError as exhausted:
            last = exhausted.last_attempt.exception()
            assert last is not None
            elapsed = time.monotonic() - started
            attempts = exhausted.last_attempt.attempt_number
            log.warning("giving up on %s after %d attempt(s): %s", describe, attempts, last)
            raise RetriesExhaustedError(
                attempts,
                elapsed,
                last,
                outcome_unknown=lost_connection or isinstance(last, ConnectionLost),
            ) from last
