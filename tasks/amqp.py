"""The bulk consumer for a RabbitMQ broker.

kombu over AMQP already delivers thousands of messages a second to one consumer, so here
the consumer lets RabbitMQ push up to ``batch_size`` unacknowledged messages
(``basic.qos`` prefetch), takes everything already delivered as one batch, assigns it in
one transaction, answers each request, and acknowledges the batch with one
``basic.ack(multiple=True)``. A consumer that dies leaves its messages unacknowledged and
RabbitMQ delivers them again. Queues are declared single-active-consumer (see
:func:`numbering.routing.kombu_queue`): RabbitMQ itself keeps standby consumers idle and
hands the queue to one of them when the active consumer goes away.
"""

from __future__ import annotations

import json
import logging
import threading

from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer

from numbering.errors import InvalidRequestError, NumberingError
from numbering.messages import MAX_MESSAGE_BYTES, BadMessage, Job, parse_task
from numbering.routing import kombu_queue
from numbering.tasks.drain import OUTAGE_BACKOFF_SECONDS, POLL_SECONDS, BatchProcessor

__all__ = ["AmqpDrain"]

log = logging.getLogger("numbering.worker")


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


class AmqpDrain:
    """The consumer of one queue on a RabbitMQ broker (run it in its own thread)."""

    def __init__(
        self,
        broker_url: str,
        queue: str,
        processor: BatchProcessor,
        *,
        batch_size: int,
        stop: threading.Event,
    ) -> None:
        self.broker_url = broker_url
        self.queue = queue
        self.processor = processor
        self.batch_size = batch_size
        self.stop = stop
        self.handled = 0
        probe = Connection(broker_url)
        self._errors: tuple[type[BaseException], ...] = (
            OSError,
            *probe.connection_errors,
            *probe.channel_errors,
        )

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with Connection(self.broker_url, heartbeat=30) as connection:
                    self._consume(connection)
            except self._errors as exc:
                log.error("consumer of %s: %s; reconnecting", self.queue, exc)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)

    def _consume(self, connection: Connection) -> None:
        channel = connection.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=self.batch_size, a_global=False)
        delivered: list[Message] = []
        consumer = Consumer(
            channel, queues=[kombu_queue(self.queue)], on_message=delivered.append, no_ack=False
        )
        with consumer:
            log.info(
                "consuming %s; RabbitMQ's single-active-consumer decides which worker is active",
                self.queue,
            )
            while not self.stop.is_set():
                try:
                    connection.drain_events(timeout=POLL_SECONDS)
                except TimeoutError:
                    connection.heartbeat_check()
                    continue
                while len(delivered) < self.batch_size:
                    try:  # take what has already arrived, without waiting for more
                        connection.drain_events(timeout=0)
                    except TimeoutError:
                        break
                batch, delivered[:] = list(delivered), []
                if not self.processor.process_until_done(
                    [parse_amqp(m) for m in batch], self.stop, self.queue
                ):
                    return  # stopped: unacknowledged messages go back to the queue
                channel.basic_ack(batch[-1].delivery_tag, multiple=True)
                self.handled += len(batch)
