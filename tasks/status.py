"""What `numbering status` shows: per sequence, its counter, its queue, its consumer.

Read-only: it looks at the database (counters, consumer locks) and the broker (queue
lengths, in-flight and quarantined requests, the oldest waiting request) and changes
nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from numbering.allocator import Allocator
from numbering.brokers import dead_letter_list, inflight_list, is_redis
from numbering.database import translate_error
from numbering.messages import SENT_AT_HEADER
from numbering.routing import kombu_queue, queue_for
from numbering.schema import sequences
from numbering.settings import Settings
from numbering.tasks.guard import consumer_alive

__all__ = ["SequenceStatus", "collect"]


@dataclass
class SequenceStatus:
    sequence: str
    last_value: int | None
    last_period: str | None
    frozen: bool
    queue: str
    waiting: int | None
    in_flight: int | None
    quarantined: int | None
    consumer: bool
    oldest_waiting_seconds: float | None

    @property
    def problems(self) -> list[str]:
        found = []
        if self.waiting and not self.consumer:
            found.append(f"{self.waiting} request(s) waiting and no active consumer")
        if self.quarantined:
            found.append(f"{self.quarantined} quarantined request(s) in {self.dead_list}")
        return found

    @property
    def dead_list(self) -> str:
        return dead_letter_list(self.queue)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


def collect(settings: Settings, allocator: Allocator) -> list[SequenceStatus]:
    """The status of every sequence (period counters folded into their sequence)."""
    try:
        rows = _counters(allocator)
    except DBAPIError as exc:  # no tables yet, no server: said as numbering says it
        raise translate_error(exc) from exc
    parents = [row for row in rows if row.parent_id is None]
    latest: dict[int, Any] = {}  # each periodic sequence's most recently used period
    for row in rows:
        if row.parent_id is not None and row.last_value is not None:
            seen = latest.get(row.parent_id)
            if seen is None or row.updated_at > seen.updated_at:
                latest[row.parent_id] = row
    broker = _Broker(settings)
    try:
        statuses = []
        for row in parents:
            queue = queue_for(row.name, settings.shards)
            period = latest.get(row.id)
            waiting, in_flight, quarantined, oldest = broker.queue_state(queue)
            statuses.append(
                SequenceStatus(
                    sequence=row.name,
                    last_value=period.last_value if period is not None else row.last_value,
                    last_period=period.period_key if period is not None else None,
                    frozen=bool(row.frozen),
                    queue=queue,
                    waiting=waiting,
                    in_flight=in_flight,
                    quarantined=quarantined,
                    consumer=_alive(allocator, broker, queue),
                    oldest_waiting_seconds=oldest,
                )
            )
        return statuses
    finally:
        broker.close()


def _counters(allocator: Allocator) -> Sequence[Any]:
    with allocator.engine.connect() as conn:
        return conn.execute(
            select(
                sequences.c.id,
                sequences.c.name,
                sequences.c.last_value,
                sequences.c.frozen,
                sequences.c.parent_id,
                sequences.c.period_key,
                sequences.c.updated_at,
            ).order_by(sequences.c.name)
        ).all()


def _alive(allocator: Allocator, broker: _Broker, queue: str) -> bool:
    if broker.amqp is not None:
        return broker.amqp_consumers(queue) > 0
    return consumer_alive(allocator.engine, queue)


class _Broker:
    def __init__(self, settings: Settings) -> None:
        self.redis: redis.Redis | None = None
        self.amqp: Any = None
        self.replies = redis.Redis.from_url(settings.result_backend, socket_timeout=5)
        if is_redis(settings.broker_url):
            self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
        else:
            from kombu.connection import Connection

            self.amqp = Connection(settings.broker_url, connect_timeout=5)

    def queue_state(self, queue: str) -> tuple[int | None, int | None, int | None, float | None]:
        """(waiting, in flight, quarantined, age in seconds of the oldest waiting)."""
        if self.redis is not None:
            pipe = self.redis.pipeline()
            pipe.llen(queue)
            pipe.llen(inflight_list(queue))
            pipe.llen(dead_letter_list(queue))
            pipe.lindex(queue, -1)  # LPUSHed: the oldest is at the right end
            waiting, in_flight, dead, oldest_raw = pipe.execute()
            return waiting, in_flight, dead, _age(oldest_raw)
        dead = self.replies.llen(dead_letter_list(queue))
        declared = self._declared(queue)
        return (None if declared is None else declared.message_count), None, dead, None

    def amqp_consumers(self, queue: str) -> int:
        declared = self._declared(queue)
        return 0 if declared is None else int(declared.consumer_count)

    def _declared(self, queue: str) -> Any:
        """RabbitMQ's counts for ``queue``, or None if it was never declared."""
        channel = self.amqp.channel()
        try:
            return kombu_queue(queue)(channel).queue_declare(passive=True)
        except self.amqp.channel_errors:  # 404: no such queue yet
            return None
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def close(self) -> None:
        self.replies.close()
        if self.redis is not None:
            self.redis.close()
        if self.amqp is not None:
            self.amqp.release()


def _age(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        sent = json.loads(raw)["headers"][SENT_AT_HEADER]
        return max(0.0, time.time() - float(sent))
    except (ValueError, KeyError, TypeError):
        return None
