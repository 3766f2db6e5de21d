"""The bulk consumer for a RabbitMQ broker.

kombu over AMQP already delivers thousands of messages a second to one consumer, so here
the consumer lets RabbitMQ push up to ``batch_size`` unacknowledged messages
(``basic.qos`` prefetch), takes everything already delivered as one batch, assigns it in
one transaction, answers each request, and acknowledges the batch with one
``basic.ack(multiple=True)``. A consumer that dies leaves its messages unacknowledged and
RabbitMQ delivers them again; redelivered messages are then tried one at a time, and one
that stopped the worker ``MAX_DELIVERIES`` times is quarantined (as on Redis, in the
Redis list ``_numbering.dead.<queue>``). Queues are declared single-active-consumer (see
:func:`numbering.routing.kombu_queue`): RabbitMQ itself keeps standby consumers idle and
hands the queue to one of them when the active consumer goes away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading

from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer

from numbering.errors import InvalidRequestError, NumberingError, QuarantinedError
from numbering.messages import MAX_MESSAGE_BYTES, BadMessage, Job, parse_task
from numbering.routing import kombu_queue
from numbering.tasks.drain import (
    MAX_DELIVERIES,
    OUTAGE_BACKOFF_SECONDS,
    POLL_SECONDS,
    BatchProcessor,
    dead_letter_list,
)

__all__ = ["AmqpDrain"]

log = logging.getLogger("numbering.worker")

# Seconds the attempt counts of redelivered messages are kept (in the reply Redis).
ATTEMPTS_TTL = 24 * 3600


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
        #: The consumer's name in logs and thread names.
        self.name = queue
        self.processor = processor
        self.batch_size = batch_size
        self.stop = stop
        self.handled = 0
        self.attempts = f"_numbering.attempts.{queue}"
        self.dead = dead_letter_list(queue)
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
            except Exception:
                # A bug must not silently end the consumer while the worker looks alive.
                log.exception("consumer of %s failed; starting over", self.queue)
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
                fresh = [m for m in batch if not m.delivery_info.get("redelivered")]
                again = [m for m in batch if m.delivery_info.get("redelivered")]
                # Redelivered messages may be what killed the last consumer: one at a time.
                for message in again:
                    if not self._one_at_a_time(message):
                        return  # stopped: unacknowledged messages go back to the queue
                    message.ack()
                if fresh:
                    items = [parse_amqp(m) for m in fresh]
                    if not self.processor.process_until_done(items, self.stop, self.queue):
                        return
                    for message in fresh:
                        message.ack()
                self.handled += len(batch)

    def _one_at_a_time(self, message: Message) -> bool:
        """Process a redelivered message alone; quarantine it after too many tries."""
        item = parse_amqp(message)
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        tag = item.task_id or hashlib.sha256(body).hexdigest()
        replies = self.processor.replies
        tries = int(replies.hincrby(self.attempts, tag, 1))
        replies.expire(self.attempts, ATTEMPTS_TTL)
        if tries > MAX_DELIVERIES:
            log.error(
                "%s: quarantined request %s after it stopped the worker %d times; kept in %s",
                self.queue,
                item.task_id,
                tries - 1,
                self.dead,
            )
            replies.lpush(
                self.dead,
                json.dumps({"headers": message.headers, "body": body.decode("utf-8", "replace")}),
            )
            if self.processor.metrics is not None:
                self.processor.metrics.quarantined.inc()
            error = QuarantinedError(
                f"request quarantined in {self.dead} after it stopped the worker "
                f"{tries - 1} times; nothing was assigned to it"
            )
            key = item.request.key if isinstance(item, Job) else item.key
            item = BadMessage(item.task_id, key, item.reply_to, error)
        if not self.processor.process_until_done([item], self.stop, self.queue):
            return False
        replies.hdel(self.attempts, tag)
        return True
