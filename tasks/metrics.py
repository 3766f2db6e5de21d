"""Prometheus metrics of a numbering worker (served when NUMBERING_METRICS_PORT is set).

============================================  =============================================
``numbering_requests_total``                  requests decided, by ``sequence`` and
                                              ``outcome`` (``assigned``, ``resent``, or the
                                              error's class name); counted once the batch
                                              has committed, before its replies go out
``numbering_batch_size``                      requests per batch (histogram)
``numbering_assignment_seconds``              one batch's database transaction, retries
                                              included (histogram)
``numbering_retries_total``                   transactions retried, by ``error``
                                              (``SerializationConflict``, ``DeadlockConflict``,
                                              ``LockNotAvailable``, ``ConnectionLost``, ...)
``numbering_quarantined_total``               requests set aside after stopping the worker
============================================  =============================================
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from numbering.assignment import Assignment, Outcome
from numbering.retry import RetryStats

__all__ = ["WorkerMetrics"]

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class _Retries(Collector):
    """Read the allocator's retry counts when scraped (they are kept by the allocator)."""

    def __init__(self, stats: RetryStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "numbering_retries", "Transactions retried, by error.", labels=["error"]
        )
        for error, count in sorted(self.stats.as_dict().items()):
            if error != "total":
                family.add_metric([error], count)
        yield family


class WorkerMetrics:
    """The metrics of one worker process, in a registry of their own."""

    def __init__(self, stats: RetryStats) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "numbering_requests",
            "Requests decided (counted at commit, before the reply), by sequence and outcome.",
            ["sequence", "outcome"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "numbering_batch_size",
            "Requests per batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.assignment_seconds = Histogram(
            "numbering_assignment_seconds",
            "Duration of one batch's database transaction, retries included.",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.quarantined = Counter(
            "numbering_quarantined",
            "Requests quarantined after they stopped the worker.",
            registry=self.registry,
        )
        self.registry.register(_Retries(stats))

    def serve(self, port: int) -> None:
        """Serve /metrics on ``port`` (all interfaces) from a daemon thread."""
        start_http_server(port, registry=self.registry)

    def batch(
        self, sequences: Sequence[str | None], outcomes: Sequence[Outcome], seconds: float | None
    ) -> None:
        self.batch_size.observe(len(outcomes))
        if seconds is not None:
            self.assignment_seconds.observe(seconds)
        for sequence, outcome in zip(sequences, outcomes, strict=True):
            if isinstance(outcome, Assignment):
                label = "resent" if outcome.resent else "assigned"
            else:
                label = type(outcome).__name__
            self.requests.labels(sequence or "-", label).inc()
