"""One redelivery policy for every broker: count, retry alone, quarantine.

A request that was handed to a consumer which then died (left in a Redis in-flight list,
or redelivered unacknowledged by RabbitMQ) may be what killed it. So such a request is
tried alone, and counted before each try (:class:`RedisAttempts`: a Redis hash
``_numbering.attempts.<queue>``, keyed by the message's id or digest). One that has now
stopped the worker :data:`MAX_DELIVERIES` times is quarantined instead of tried again:
kept in the dead-letter list ``_numbering.dead.<queue>`` for an operator (``numbering
quarantine list`` / ``replay``), in one format whatever the broker (a kombu Redis
envelope), and answered with :class:`~numbering.errors.QuarantinedError`, so the queue
keeps flowing. The consumer loop (:mod:`numbering.tasks.consumer`) is the one caller.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from numbering.brokers import attempts_hash, dead_letter_list
from numbering.errors import QuarantinedError
from numbering.messages import BadMessage, Job
from numbering.tasks.metrics import WorkerMetrics
from numbering.tasks.transport import AttemptStore

__all__ = [
    "ATTEMPTS_TTL",
    "MAX_DELIVERIES",
    "RedisAttempts",
    "Redelivery",
    "redis_dead_letters",
    "redis_quarantined",
]

log = logging.getLogger("numbering.worker")

# A request left in flight this many times by a consumer that died is quarantined.
MAX_DELIVERIES = 3
# Seconds an attempts hash outlives its last count (a counted request that was then
# answered is forgotten at once; this bounds what a crash mid-way leaves behind).
ATTEMPTS_TTL = 24 * 3600


class RedisAttempts:
    """Attempt counts and dead letters on a Redis server (the broker's, or on RabbitMQ
    the reply Redis: RabbitMQ has no place for them that a replay could use)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def count(self, queue: str, tag: str) -> int:
        pipe = self.client.pipeline()
        pipe.hincrby(attempts_hash(queue), tag, 1)
        pipe.expire(attempts_hash(queue), ATTEMPTS_TTL)
        tries, _ = pipe.execute()
        return int(tries)

    def forget(self, queue: str, tag: str, pipe: Any = None) -> None:
        """Drop the count (on ``pipe``, a pipeline that acknowledges the request in the
        same transaction, if given)."""
        (pipe or self.client).hdel(attempts_hash(queue), tag)

    def keep(self, queue: str, stored: bytes | str) -> str:
        dead = dead_letter_list(queue)
        self.client.lpush(dead, stored)
        return dead


def redis_dead_letters(client: redis.Redis, queue: str | None) -> list[tuple[str, bytes | str]]:
    """The dead letters kept in ``client`` (of ``queue`` only, if given), oldest first,
    each with its queue."""
    prefix = dead_letter_list("")
    if queue is not None:
        lists = [dead_letter_list(queue)]
    else:
        lists = sorted(key.decode() for key in client.scan_iter(match=f"{prefix}*"))
    return [
        (name[len(prefix) :], raw)
        for name in lists
        for raw in reversed(client.lrange(name, 0, -1))  # LPUSHed: the oldest at the right
    ]


def redis_quarantined(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """How many dead letters ``client`` keeps for each of ``queues``."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(dead_letter_list(queue))
    return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}


class Redelivery:
    """The policy, over the store that keeps the counts and dead letters."""

    def __init__(self, store: AttemptStore, metrics: WorkerMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics

    def count(self, queue: str, tag: str, redeliveries: int | None = None) -> int:
        """Count one more try of the request ``tag`` on ``queue``; how many so far
        (``redeliveries``: the broker's own count, where it keeps one)."""
        if redeliveries is not None:
            return redeliveries
        return self.store.count(queue, tag)

    def exhausted(self, tries: int) -> bool:
        """Whether a request on its ``tries``-th try has stopped the worker too often."""
        return tries > MAX_DELIVERIES

    def quarantine(
        self, queue: str, item: Job | BadMessage, stored: bytes | str, tries: int
    ) -> BadMessage:
        """Keep ``stored`` in ``queue``'s dead-letter list and return what to answer the
        request with (its :class:`QuarantinedError`)."""
        key = item.request.key if isinstance(item, Job) else item.key
        stopped = tries - 1
        dead = self.store.keep(queue, stored)
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
        if self.metrics is not None:
            self.metrics.quarantined.inc()
        error = QuarantinedError(
            f"request quarantined in {dead} after it stopped the worker {stopped} times; "
            "nothing was assigned to it"
        )
        return BadMessage(item.task_id, key, item.reply_to, error)
