"""The RabbitMQ transport.

kombu over AMQP already delivers thousands of messages a second to one consumer, so here
RabbitMQ pushes up to ``batch_size`` unacknowledged messages per queue (``basic.qos``
prefetch), and a turn takes everything already delivered from all of the worker's queues
as one batch. A consumer that dies leaves its messages unacknowledged and RabbitMQ
delivers them again, marked redelivered. Queues are declared single-active-consumer (see
:func:`numbering.routing.kombu_queue`): RabbitMQ itself keeps standby consumers idle and
hands the queue to one of them when the active consumer goes away. Attempt counts and
dead letters live in the reply Redis (RabbitMQ has no place for them that a replay could
use).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence

import redis
from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer

from numbering.errors import InvalidRequestError, NumberingError
from numbering.messages import MAX_MESSAGE_BYTES, BadMessage, Job, envelope, parse_task
from numbering.routing import kombu_queue
from numbering.tasks.redelivery import RedisAttempts
from numbering.tasks.transport import Delivery, consumer_name

__all__ = ["AmqpTransport", "parse_amqp"]

log = logging.getLogger("numbering.worker")

# Seconds a consumer waits for a delivery before checking its stop flag and heartbeats.
POLL_SECONDS = 1


def parse_amqp(message: Message) -> Job | BadMessage:
    """A delivered AMQP message as a :class:`Job`, or why it is refused."""
    try:
        if message.content_type != "application/json":
            raise InvalidRequestError(
                f"message content type {message.content_type!r} refused: JSON only"
            )
        body = message.body
        if len(body) > MAX_MESSAGE_BYTES:
            raise InvalidRequestError(
                f"message is {len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}"
            )
        try:
            decoded = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequestError("message body is not JSON") from None
        headers = message.headers if isinstance(message.headers, dict) else {}
    except NumberingError as error:
        return BadMessage(None, None, None, error)
    return parse_task(headers, decoded)


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()


class AmqpTransport:
    """One connection, one channel, one kombu consumer per queue on it: what RabbitMQ has
    delivered from any of the queues is one batch. RabbitMQ picks the active consumer of
    each queue on its own, so a worker may be active on some of its queues and a standby
    on others."""

    def __init__(
        self, broker_url: str, queues: Sequence[str], *, replies: redis.Redis, batch_size: int
    ) -> None:
        self.name = consumer_name(queues)
        self.broker_url = broker_url
        self.queues = list(queues)
        self.attempts = RedisAttempts(replies)
        self.batch_size = batch_size
        probe = Connection(broker_url)
        self.errors: tuple[type[BaseException], ...] = (
            OSError,
            *probe.connection_errors,
            *probe.channel_errors,
        )
        self._connection: Connection | None = None
        self._consumers: contextlib.ExitStack | None = None
        self._delivered: list[tuple[str, Message]] = []
        self._active: set[str] = set()  # the queues that have delivered on this connection

    def open(self) -> None:
        connection = Connection(self.broker_url, heartbeat=30)
        self._connection = connection
        self._consumers = consumers = contextlib.ExitStack()
        self._delivered = []
        self._active = set()
        channel = connection.channel()
        # Per consumer (a_global=False): each queue may have batch_size unacknowledged.
        channel.basic_qos(prefetch_size=0, prefetch_count=self.batch_size, a_global=False)

        def receiver(queue: str) -> Callable[[Message], None]:
            return lambda message: self._delivered.append((queue, message))

        for queue in self.queues:
            consumers.enter_context(
                Consumer(
                    channel, queues=[kombu_queue(queue)], on_message=receiver(queue), no_ack=False
                )
            )
        log.info(
            "consuming %s; RabbitMQ's single-active-consumer decides which worker is active",
            self.name,
        )

    def receive(self, limit: int) -> list[Delivery]:
        connection = self._connection
        assert connection is not None, "open() first"
        try:
            connection.drain_events(timeout=POLL_SECONDS)
        except TimeoutError:
            connection.heartbeat_check()
            return []
        while len(self._delivered) < limit:
            try:  # take what has already arrived, without waiting for more
                connection.drain_events(timeout=0)
            except TimeoutError:
                break
        batch, self._delivered = self._delivered, []
        for queue in dict.fromkeys(queue for queue, _ in batch):
            if queue not in self._active:
                # RabbitMQ delivers only to a queue's active consumer: the first delivery
                # is how a standby learns that it took the queue over.
                self._active.add(queue)
                log.info("active consumer of %s (RabbitMQ delivers to this worker)", queue)
        return [
            Delivery(queue, parse_amqp(m), bool(m.delivery_info.get("redelivered")), m)
            for queue, m in batch
        ]

    def tag(self, delivery: Delivery) -> str:
        return delivery.item.task_id or hashlib.sha256(_body(delivery.raw)).hexdigest()

    def dead_letter(self, delivery: Delivery) -> str:
        message: Message = delivery.raw
        headers = message.headers if isinstance(message.headers, dict) else {}
        return envelope(
            delivery.queue,
            headers,
            _body(message),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.properties.get("correlation_id"),
        )

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            delivery.raw.ack()
            if delivery.redelivered:
                self.attempts.forget(delivery.queue, self.tag(delivery))

    def flush(self) -> None:
        """Nothing is deferred: every ack is sent as it is made."""

    def recheck(self) -> None:
        """RabbitMQ, not the database, picks the active consumer: nothing to check."""

    def close(self, stopping: bool) -> None:
        # Unacknowledged messages go back to their queue when the connection closes.
        connection, self._connection = self._connection, None
        consumers, self._consumers = self._consumers, None
        try:
            if consumers is not None:
                consumers.close()
        finally:
            if connection is not None:
                connection.release()
