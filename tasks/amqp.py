"""The bulk consumer for a RabbitMQ broker.

kombu over AMQP already delivers thousands of messages a second to one consumer, so here
the consumer lets RabbitMQ push up to ``batch_size`` unacknowledged messages per queue
(``basic.qos`` prefetch), takes everything already delivered from all of the worker's
queues as one batch, assigns it in one transaction, answers each request, and then
acknowledges each message. A consumer that dies leaves its messages unacknowledged and
RabbitMQ delivers them again; redelivered messages are then tried one at a time, and one
that stopped the worker ``MAX_DELIVERIES`` times is quarantined (as on Redis, in the
Redis list ``_numbering.dead.<queue>``). Queues are declared single-active-consumer (see
:func:`numbering.routing.kombu_queue`): RabbitMQ itself keeps standby consumers idle and
hands the queue to one of them when the active consumer goes away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer

from numbering.errors import InvalidRequestError, NumberingError
from numbering.messages import MAX_MESSAGE_BYTES, BadMessage, Job, parse_task
from numbering.routing import Shard, kombu_queue
from numbering.tasks.drain import (
    OUTAGE_BACKOFF_SECONDS,
    POLL_SECONDS,
    BatchProcessor,
)
from numbering.tasks.redelivery import Redelivery

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
    """The consumer of a worker's queues on a RabbitMQ broker (run it in its own thread).

    One channel, one kombu consumer per queue on it: what RabbitMQ has delivered from any
    of the queues is one batch, assigned in one transaction. RabbitMQ picks the active
    consumer of each queue on its own, so a worker may be active on some of its queues
    and a standby on others.
    """

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        processor: BatchProcessor,
        *,
        batch_size: int,
        stop: threading.Event,
        shards: Mapping[str, Shard] | None = None,
    ) -> None:
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        self.broker_url = broker_url
        self.queues = list(queues)
        #: The consumer's name in logs and thread names: its queues.
        self.name = ",".join(self.queues)
        self.processor = processor
        # Attempt counts and dead letters live in the reply Redis (RabbitMQ has no place
        # for them that a replay could use).
        self.redelivery = Redelivery(processor.replies, processor.metrics)
        self.batch_size = batch_size
        self.stop = stop
        self.shards = dict(shards or {})
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
                log.error("consumer of %s: %s; reconnecting", self.name, exc)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            except Exception:
                # A bug must not silently end the consumer while the worker looks alive.
                log.exception("consumer of %s failed; starting over", self.name)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)

    def _consume(self, connection: Connection) -> None:
        channel = connection.channel()
        # Per consumer (a_global=False): each queue may have batch_size unacknowledged.
        channel.basic_qos(prefetch_size=0, prefetch_count=self.batch_size, a_global=False)
        delivered: list[tuple[str, Message]] = []
        active: set[str] = set()  # the queues that have delivered on this connection

        def receiver(queue: str) -> Callable[[Message], None]:
            return lambda message: delivered.append((queue, message))

        with contextlib.ExitStack() as consumers:
            for queue in self.queues:
                consumers.enter_context(
                    Consumer(
                        channel,
                        queues=[kombu_queue(queue)],
                        on_message=receiver(queue),
                        no_ack=False,
                    )
                )
            log.info(
                "consuming %s; RabbitMQ's single-active-consumer decides which worker is active",
                self.name,
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
                for queue in dict.fromkeys(q for q, _ in batch):
                    if queue not in active:
                        # RabbitMQ delivers only to a queue's active consumer: the first
                        # delivery is how a standby learns that it took the queue over.
                        active.add(queue)
                        log.info("active consumer of %s (RabbitMQ delivers to this worker)", queue)
                fresh = [(q, m) for q, m in batch if not m.delivery_info.get("redelivered")]
                again = [(q, m) for q, m in batch if m.delivery_info.get("redelivered")]
                # Redelivered messages may be what killed the last consumer: one at a time.
                for queue, message in again:
                    if not self._one_at_a_time(queue, message):
                        return  # stopped: unacknowledged messages go back to the queue
                    message.ack()
                if fresh:
                    items = [parse_amqp(m) for _, m in fresh]
                    shards = [self.shards.get(q) for q, _ in fresh]
                    if not self.processor.process_until_done(items, self.stop, self.name, shards):
                        return
                    for _, message in fresh:
                        message.ack()
                self.handled += len(batch)

    def _one_at_a_time(self, queue: str, message: Message) -> bool:
        """Process a redelivered message alone; quarantine it after too many tries."""
        item = parse_amqp(message)
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        tag = item.task_id or hashlib.sha256(body).hexdigest()
        tries = self.redelivery.count(queue, tag)
        if self.redelivery.exhausted(tries):
            stored = json.dumps(
                {"headers": message.headers, "body": body.decode("utf-8", "replace")}
            )
            item = self.redelivery.quarantine(queue, item, stored, tries)
        shard = self.shards.get(queue)
        if not self.processor.process_until_done([item], self.stop, queue, [shard]):
            return False
        self.redelivery.forget(queue, tag)
        return True
