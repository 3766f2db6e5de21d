"""Quarantined requests: list them, and put them back in their queue once fixed.

A request that stopped the worker ``MAX_DELIVERIES`` times is kept in the Redis list
``_numbering.dead.<queue>`` (on the broker's Redis, or on the reply Redis when the broker
is RabbitMQ with classic queues), or in RabbitMQ's dead-letter queue
``numbering/quarantine`` (quorum queues), and answered with ``QuarantinedError``. Either
way it is listed in one format, a kombu Redis envelope. After the cause is fixed,
``replay`` moves such requests back to their queue with a fresh count of attempts (on
RabbitMQ: publishes them again, confirmed, before it drops the dead letter). Replaying
is safe for the ledger: a request that was in fact assigned gets its number back by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from numbering.errors import NumberingError
from numbering.messages import SENT_AT_HEADER, Job, decode_redis_message, parse_task
from numbering.routing import queue_for
from numbering.settings import Settings
from numbering.tasks.transport import open_broker

__all__ = ["Quarantined", "list_quarantined", "replay"]


@dataclass(frozen=True)
class Quarantined:
    queue: str
    task_id: str | None
    sequence: str | None
    key: str | None
    sent_at: float | None
    problem: str | None  # why the message itself does not parse, if it does not


def list_quarantined(settings: Settings, sequence: str | None = None) -> list[Quarantined]:
    """Every quarantined request (of ``sequence``'s queue only, if given), oldest first."""
    broker = open_broker(settings)
    try:
        only = None if sequence is None else queue_for(sequence, settings.shards)
        return [_describe(queue, raw) for queue, raw in broker.dead_letters(only)]
    finally:
        broker.close()


def _describe(queue: str, raw: bytes | str) -> Quarantined:
    try:
        stored = json.loads(raw)
        # Kept before dead letters had one format: a RabbitMQ request as headers + body.
        if "body" in stored and "properties" not in stored:
            headers, body = stored["headers"], json.loads(stored["body"])
        else:
            headers, body = decode_redis_message(raw)
        item = parse_task(headers, body)
    except (ValueError, KeyError, TypeError, NumberingError) as exc:
        return Quarantined(queue, None, None, None, None, f"unreadable: {exc}")
    sent_at = headers.get(SENT_AT_HEADER) if isinstance(headers, dict) else None
    if isinstance(item, Job):
        return Quarantined(
            queue,
            item.task_id,
            item.sequence,
            item.request.key,
            float(sent_at) if isinstance(sent_at, int | float) else None,
            None,
        )
    return Quarantined(queue, item.task_id, None, item.key, None, str(item.error))


def replay(settings: Settings, sequence: str) -> int:
    """Move ``sequence``'s quarantined requests back to its queue, with their attempt
    counts reset. Returns how many were moved."""
    broker = open_broker(settings)
    try:
        return broker.requeue(queue_for(sequence, settings.shards))
    finally:
        broker.close()
