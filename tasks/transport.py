"""What a broker must do for numbering's consumer loop, and nothing more.

:class:`numbering.tasks.consumer.Consumer` is the one loop: take a batch, try what a
stopped consumer left behind alone (counted, quarantined after ``MAX_DELIVERIES``), assign
the rest in one transaction, answer, acknowledge. A :class:`Transport` is how one broker
hands it messages and takes acknowledgements:

- :class:`~numbering.tasks.redis_transport.RedisTransport`: the ack-and-drain script,
  in-flight lists, the doorbell, consumer locks in the database;
- :class:`~numbering.tasks.amqp_transport.AmqpTransport`: basic.qos prefetch,
  single-active-consumer queues, per-message acks;
- :class:`~numbering.tasks.memory.MemoryTransport`: in-process queues, shipped in the
  package for ``numbering demo`` and for unit tests of the loop.

A transport that the consumer survives reconnecting to lists its connection errors in
:attr:`Transport.errors`; the loop logs them, waits and calls :meth:`Transport.open` again.

A :class:`Broker` is the same broker seen by the operator's commands and the worker's
start-up check: queue lengths and consumers (``numbering status``), where dead letters
are kept and how they go back (``numbering quarantine``), what may make it drop requests.
:func:`open_broker` is the one place that picks the implementation by the URL's kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from numbering.brokers import broker_kind, redis_client
from numbering.errors import ConfigurationError
from numbering.messages import SENT_AT_HEADER, BadMessage, Job

if TYPE_CHECKING:
    import threading

    import redis
    from sqlalchemy import Engine

    from numbering.settings import Settings

__all__ = [
    "AttemptStore",
    "Broker",
    "Delivery",
    "QueueState",
    "Transport",
    "age_of",
    "consumer_name",
    "open_broker",
    "open_transport",
]


@dataclass
class Delivery:
    """One message as a transport delivered it."""

    #: The queue it came from.
    queue: str
    #: The parsed request, or why it cannot be one.
    item: Job | BadMessage
    #: Left by a consumer that stopped before acknowledging it (Redis: in an in-flight
    #: list; RabbitMQ: redelivered): it may be what stopped it, so it is tried alone.
    redelivered: bool
    #: The message as the transport has it (a Redis envelope, a kombu message, ...).
    raw: Any = None
    #: How many times it came back to a consumer, this time included, when the broker
    #: counts (RabbitMQ quorum queues: ``x-delivery-count``); None: the attempt store
    #: counts (as :class:`AttemptStore` does: 1 on the first redelivery).
    redeliveries: int | None = None
    #: Set by the consumer when it quarantines the message: acknowledging it then hands
    #: it to the broker's dead-letter queue where the broker keeps dead letters.
    quarantined: bool = False


class AttemptStore(Protocol):
    """Where the redelivery policy keeps its counts and its dead letters."""

    def count(self, queue: str, tag: str) -> int:
        """Count one more try of the message ``tag`` on ``queue``; how many so far."""

    def forget(self, queue: str, tag: str) -> None:
        """Drop the count of ``tag``: it was answered."""

    def keep(self, queue: str, stored: bytes | str) -> str:
        """Keep a quarantined message for an operator; return where it is kept."""


class Transport(Protocol):
    """One broker's side of the consumer loop (see the module doc)."""

    #: The transport's queues, for logs and thread names.
    name: str
    #: Errors after which the loop waits and opens the transport again.
    errors: tuple[type[BaseException], ...]

    @property
    def attempts(self) -> AttemptStore:
        """Where attempt counts and dead letters are kept."""

    def open(self) -> None:
        """Connect (again, after one of :attr:`errors`); what was delivered and not
        acknowledged before comes back marked ``redelivered``."""

    def receive(self, limit: int, more: bool = False) -> list[Delivery]:
        """Up to ``limit`` messages; waits about a second for the first, then returns
        what there is (an empty list: nothing came, or this consumer is a standby).

        ``more``: the consumer has batches in flight (unanswered): return at once what
        has already arrived, and nothing at all when the
        transport has work that must wait until every batch is answered (checking its
        consumer locks, handing a queue over): the consumer then answers them all and
        calls again without ``more``."""

    def tag(self, delivery: Delivery) -> str:
        """A stable name of the message, for its attempt count."""

    def dead_letter(self, delivery: Delivery) -> bytes | str:
        """The message as quarantine keeps it: a kombu Redis envelope, the one format
        ``numbering quarantine list`` reads and ``replay`` puts back."""

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """The deliveries are answered: the broker may forget them (a quarantined one on a
        broker that keeps dead letters itself goes to its dead-letter queue), and the
        attempt counts of redelivered ones are dropped. May be deferred until the next
        :meth:`receive` or :meth:`flush` (Redis sends it with the next drain). Batches
        are acknowledged in the order they were received."""

    def flush(self) -> None:
        """Send deferred acknowledgements now (the consumer is ending its turn normally)."""

    def recheck(self) -> None:
        """Make sure, before the next batch, that this consumer is still the active one
        (the database failed over: a consumer lock held there is gone). Any thread may
        call it."""

    def close(self, stopping: bool) -> None:
        """Disconnect, without sending deferred acknowledgements (after a failure they
        may no longer be right); ``stopping``: the consumer ends (give up consumer locks
        too)."""


def consumer_name(queues: Iterable[str]) -> str:
    """A transport's :attr:`~Transport.name`: its queues, comma-separated (a consumer
    without a queue is a mistake in the caller)."""
    name = ",".join(queues)
    if not name:
        raise ValueError("a consumer needs at least one queue")
    return name


@dataclass
class QueueState:
    """What a broker tells of one queue (None: it cannot tell)."""

    waiting: int | None
    in_flight: int | None
    #: Seconds since the oldest waiting request was sent.
    oldest_seconds: float | None


class Broker(Protocol):
    """One broker, seen by ``numbering status``, ``numbering quarantine`` and the worker's
    start-up check (see the module doc)."""

    def declare(self, queues: Sequence[str]) -> list[str]:
        """Declare ``queues`` as the worker consumes them; the problems that keep it from
        starting (a queue that exists with other arguments)."""

    def dead_letters(self, queue: str | None = None) -> list[tuple[str, bytes | str]]:
        """The quarantined requests (of ``queue`` only, if given), oldest first, each with
        its queue, in one format (a kombu Redis envelope)."""

    def queue_state(self, queue: str) -> QueueState:
        """How many requests wait in ``queue``, how many are in flight, how old the oldest
        is."""

    def consumers(self, queue: str) -> int | None:
        """How many consumers the broker has for ``queue`` (None: not the broker's to say:
        on Redis the active consumer holds a lock in the database)."""

    def warnings(self) -> list[str]:
        """What may make the broker drop queued requests (at the worker's start)."""

    def quarantined(self, queues: Sequence[str]) -> dict[str, int]:
        """How many quarantined requests each of ``queues`` has."""

    def holders(self, queues: Sequence[str]) -> dict[str, str]:
        """The worker that last took each of ``queues`` as its active consumer, where the
        broker keeps it (Redis brokers; whether it still holds it is the database's to
        say)."""

    def requeue(self, queue: str) -> int:
        """Put ``queue``'s dead letters back on it, oldest first, their attempt counts
        forgotten; how many."""

    def close(self) -> None: ...


def open_transport(
    settings: Settings,
    queues: Sequence[str],
    *,
    engine: Engine,
    replies: redis.Redis,
    stop: threading.Event,
    fleet: int | None = None,
) -> Transport:
    """The :class:`Transport` of a worker's ``queues`` on ``settings.broker_url``. On
    Redis each queue's active consumer holds a lock in the database of ``engine``; on
    RabbitMQ attempt counts and dead letters are kept in ``replies``. ``fleet=K``: the
    queues are the K shard queues, spread over the workers started so
    (:mod:`numbering.tasks.fleet`)."""
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        from numbering.tasks.guard import consumer_lock
        from numbering.tasks.redis_transport import RedisTransport

        locks = {queue: consumer_lock(engine, queue) for queue in queues}
        broker = redis_client(settings.broker_url, settings.sentinel_master)
        members = None
        if fleet is not None:
            from numbering.tasks.fleet import Fleet

            members = Fleet(broker, fleet)
        return RedisTransport(broker, locks, stop=stop, fleet=members)
    if kind == "amqp":
        from numbering.tasks.amqp_transport import AmqpTransport
        from numbering.tasks.fleet import Fleet
        from numbering.tasks.guard import consumer_lock

        return AmqpTransport(
            settings.broker_url,
            queues,
            replies=replies,
            batch_size=settings.batch_size,
            queue_type=settings.queue_type,
            fleet=None if fleet is None else Fleet(replies, fleet),
            locks=None if fleet is None else {q: consumer_lock(engine, q) for q in queues},
        )
    raise _no_queues(settings)


def open_broker(settings: Settings) -> Broker:
    """The :class:`Broker` of ``settings.broker_url``."""
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        from numbering.tasks.redis_transport import RedisBroker

        return RedisBroker(settings.broker_url, settings.sentinel_master)
    if kind == "amqp":
        from numbering.tasks.amqp_transport import AmqpBroker

        return AmqpBroker(
            settings.broker_url,
            settings.result_backend,
            settings.sentinel_master,
            queue_type=settings.queue_type,
        )
    raise _no_queues(settings)


def _no_queues(settings: Settings) -> ConfigurationError:
    return ConfigurationError(
        "numbering's queues need a Redis or RabbitMQ broker; NUMBERING_BROKER_URL is "
        f"{settings.broker_url.split('://')[0]}://"
    )


def age_of(raw: bytes | str | None) -> float | None:
    """Seconds since the request ``raw`` (a kombu Redis envelope) was sent."""
    if raw is None:
        return None
    try:
        sent = json.loads(raw)["headers"][SENT_AT_HEADER]
        return max(0.0, time.time() - float(sent))
    except (ValueError, KeyError, TypeError):
        return None
