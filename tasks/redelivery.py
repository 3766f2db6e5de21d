"""One redelivery policy for every broker: count, retry alone, quarantine.

A request that was handed to a consumer which then died (left in a Redis in-flight list,
or redelivered unacknowledged by RabbitMQ) may be what killed it. So such a request is
tried alone, and counted before each try in a Redis hash (``_numbering.attempts.<queue>``,
keyed by the message's id or digest). One that has now stopped the worker
:data:`MAX_DELIVERIES` times is quarantined instead of tried again: kept in the Redis
list ``_numbering.dead.<queue>`` for an operator (``numbering quarantine list`` /
``replay``) and answered with :class:`~numbering.errors.QuarantinedError`, so the queue
keeps flowing. The consumers of both brokers ask this module; only what they store in
the dead-letter list differs (the Redis envelope as it was, which ``replay`` puts back;
RabbitMQ's headers and body).
"""

from __future__ import annotations

import logging

import redis

from numbering.brokers import attempts_hash, dead_letter_list
from numbering.errors import QuarantinedError
from numbering.messages import BadMessage, Job
from numbering.tasks.metrics import WorkerMetrics

__all__ = ["ATTEMPTS_TTL", "MAX_DELIVERIES", "Redelivery"]

log = logging.getLogger("numbering.worker")

# A request left in flight this many times by a consumer that died is quarantined.
MAX_DELIVERIES = 3
# Seconds an attempts hash outlives its last count (a counted request that was then
# answered is forgotten at once; this bounds what a crash mid-way leaves behind).
ATTEMPTS_TTL = 24 * 3600


class Redelivery:
    """The policy, over the Redis server that keeps the counts and dead letters."""

    def __init__(self, store: redis.Redis, metrics: WorkerMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics

    def count(self, queue: str, tag: str) -> int:
        """Count one more try of the request ``tag`` on ``queue``; how many so far."""
        pipe = self.store.pipeline()
        pipe.hincrby(attempts_hash(queue), tag, 1)
        pipe.expire(attempts_hash(queue), ATTEMPTS_TTL)
        tries, _ = pipe.execute()
        return int(tries)

    def forget(self, queue: str, tag: str, client: redis.Redis | None = None) -> None:
        """The request was answered: drop its count (on ``client``, a pipeline that
        acknowledges the request in the same transaction, if given)."""
        (client or self.store).hdel(attempts_hash(queue), tag)

    def exhausted(self, tries: int) -> bool:
        """Whether a request on its ``tries``-th try has stopped the worker too often."""
        return tries > MAX_DELIVERIES

    def quarantine(
        self, queue: str, item: Job | BadMessage, stored: bytes | str, tries: int
    ) -> BadMessage:
        """Keep ``stored`` in ``queue``'s dead-letter list and return what to answer the
        request with (its :class:`QuarantinedError`)."""
        dead = dead_letter_list(queue)
        key = item.request.key if isinstance(item, Job) else item.key
        stopped = tries - 1
        log.error(
            "%s: quarantined request %s (key %r) after it stopped the worker %d times; "
            "it is kept in %s",
            queue,
            item.task_id,
            key,
            stopped,
            dead,
            extra={"key": key, "task_id": item.task_id, "queue": queue},
        )
        self.store.lpush(dead, stored)
        if self.metrics is not None:
            self.metrics.quarantined.inc()
        error = QuarantinedError(
            f"request quarantined in {dead} after it stopped the worker {stopped} times; "
            "nothing was assigned to it"
        )
        return BadMessage(item.task_id, key, item.reply_to, error)
