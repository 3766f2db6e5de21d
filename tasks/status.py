"""What `numbering status` shows: per sequence, its counter, its queue, its consumer.

Read-only: it looks at the database (counters, consumer locks) and the broker (queue
lengths, in-flight and quarantined requests, the oldest waiting request) and changes
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError

from numbering.backends.base import connected
from numbering.database import translate_error
from numbering.errors import NumberingError
from numbering.routing import queue_for
from numbering.schema import sequences
from numbering.settings import Settings, mask_url
from numbering.tasks.guard import consumer_alive
from numbering.tasks.transport import Broker, open_broker

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
    #: The worker that holds the queue's consumer lock (Redis brokers), if it is alive.
    holder: str | None = None

    @property
    def problems(self) -> list[str]:
        found = []
        if self.waiting and not self.consumer:
            found.append(f"{self.waiting} request(s) waiting and no active consumer")
        if self.quarantined:
            found.append(
                f"{self.quarantined} quarantined request(s) (numbering quarantine list "
                f"{self.sequence!r})"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


def collect(settings: Settings, database: Engine | Connection) -> list[SequenceStatus]:
    """The status of every sequence (period counters folded into their sequence), read
    on ``database`` (an engine, or a connection to read on: Django's, say)."""
    try:
        rows = _counters(database)
    except DBAPIError as exc:  # no tables yet, no server: said as numbering says it
        raise translate_error(exc) from exc
    parents = [row for row in rows if row.parent_id is None]
    latest: dict[int, Any] = {}  # each periodic sequence's most recently used period
    for row in rows:
        if row.parent_id is not None and row.last_value is not None:
            seen = latest.get(row.parent_id)
            if seen is None or row.updated_at > seen.updated_at:
                latest[row.parent_id] = row
    try:
        return _statuses(settings, database, parents, latest)
    except (NumberingError, DBAPIError):
        raise
    except Exception as exc:  # redis, kombu, amqp, sockets: the broker's side
        raise NumberingError(
            f"cannot read the queues: the broker at {mask_url(settings.broker_url)} did not "
            f"answer ({type(exc).__name__}: {exc}); is it running?"
        ) from exc


def _statuses(
    settings: Settings, database: Engine | Connection, parents: list[Any], latest: dict[int, Any]
) -> list[SequenceStatus]:
    broker = open_broker(settings)
    try:
        statuses = []
        queues = {row.name: queue_for(row.name, settings.shards) for row in parents}
        distinct = list(dict.fromkeys(queues.values()))
        dead = broker.quarantined(distinct)
        holders = broker.holders(distinct)
        for row in parents:
            queue = queues[row.name]
            period = latest.get(row.id)
            state = broker.queue_state(queue)
            quarantined = dead[queue]
            alive = _alive(database, broker, queue)
            statuses.append(
                SequenceStatus(
                    sequence=row.name,
                    last_value=period.last_value if period is not None else row.last_value,
                    last_period=period.period_key if period is not None else None,
                    frozen=bool(row.frozen),
                    queue=queue,
                    waiting=state.waiting,
                    in_flight=state.in_flight,
                    quarantined=quarantined,
                    consumer=alive,
                    oldest_waiting_seconds=state.oldest_seconds,
                    holder=holders.get(queue) if alive else None,
                )
            )
        return statuses
    finally:
        broker.close()


def _counters(database: Engine | Connection) -> Sequence[Any]:
    with connected(database) as conn:
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


def _alive(database: Engine | Connection, broker: Broker, queue: str) -> bool:
    consumers = broker.consumers(queue)
    if consumers is None:  # the active consumer holds a lock in the database
        return consumer_alive(database, queue)
    return consumers > 0
