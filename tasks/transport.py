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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from numbering.messages import BadMessage, Job

__all__ = ["AttemptStore", "Delivery", "Transport", "consumer_name"]


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

    def receive(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` messages; waits about a second for the first, then returns
        what there is (an empty list: nothing came, or this consumer is a standby)."""

    def tag(self, delivery: Delivery) -> str:
        """A stable name of the message, for its attempt count."""

    def dead_letter(self, delivery: Delivery) -> bytes | str:
        """The message as quarantine keeps it: a kombu Redis envelope, the one format
        ``numbering quarantine list`` reads and ``replay`` puts back."""

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """The deliveries are answered: the broker may forget them, and the attempt
        counts of redelivered ones are dropped. May be deferred until the next
        :meth:`receive` or :meth:`flush` (Redis sends it with the next drain)."""

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
